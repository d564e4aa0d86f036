"""drkeras: five papers on joint diabetic-retinopathy lesion segmentation and grading, in tf.keras.

Importing the package sets what its dependencies need before they load, without overriding a
value the user set: ``SM_FRAMEWORK=tf.keras`` makes segmentation-models build on ``tf.keras``
(it would otherwise look for the standalone ``keras`` package and fail), so any Python in the
project's environment can ``import drkeras, segmentation_models``.
"""

import os

os.environ.setdefault("SM_FRAMEWORK", "tf.keras")
