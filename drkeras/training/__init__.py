"""Training algorithms: ``tf.keras.Model`` subclasses with a custom ``train_step``, one per paper.

Each trainer receives its sub-networks (from :mod:`drkeras.models`) in ``__init__``, takes named
optimizers in ``compile`` (refusing an ambiguous ``optimizer=``/``loss=``), reduces its losses
over the global batch so it runs unchanged under a ``MirroredStrategy``, and lists the paper's
algorithm as numbered steps in its docstring (docs/design.md section 4).

Modules:
    bilevel: PLDMLT's Algorithm 1, the multi-task network and the label update network trained
        with a second-order meta-gradient (``BilevelMultiTaskTrainer``), and ``stateless_call``
        (a Keras model evaluated at substituted weights).
    adversarial: Zhou et al. 2019, generator pre-training and the collaborative stage
        (generator, discriminator and lesion-attentive grader, one optimizer each).
    ssl_gan: Lecouat et al. 2018, the K+1-class discriminator step, feature matching for the
        generator, the EMA of the discriminator that is evaluated.
    cooperative: the classifier and segmentation agents with two optimizers at different
        rates, both updating the shared encoder.
    distribute: device strategies, mixed precision, determinism.
    optim: optimizers and learning-rate schedules from the config.
    callbacks: history CSV shared by training stages, NaN guard.
    checkpoint: resumable stages (models, every optimizer, metrics, random and data position).
"""
