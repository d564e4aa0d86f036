"""Training algorithms: ``tf.keras.Model`` subclasses with a custom ``train_step``, one per paper.

Each trainer receives its sub-networks (from :mod:`drkeras.models`) in ``__init__``, takes named
optimizers in ``compile`` (refusing an ambiguous ``optimizer=``/``loss=``), reduces its losses
over the global batch so it runs unchanged under a ``MirroredStrategy``, and lists the paper's
algorithm as numbered steps in its docstring (DESIGN.md section 4).

Modules:
    bilevel: PLDMLT's Algorithm 1, the multi-task network and the label update network trained
        with a second-order meta-gradient (``BilevelMultiTaskTrainer``), and ``stateless_call``
        (a Keras model evaluated at substituted weights).
    distribute: device strategies, mixed precision, determinism.
    optim: optimizers and learning-rate schedules from the config.
    callbacks: history CSV shared by training stages, NaN guard.
    checkpoint: resumable stages (models, every optimizer, metrics, random and data position).
"""
