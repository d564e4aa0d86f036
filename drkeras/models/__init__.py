"""Networks: functional builders ``build_<name>(*, input_shape, ..., name=...) -> tf.keras.Model``.

Every builder returns a functional ``tf.keras.Model`` whose outputs are a dict keyed by the
names in :mod:`drkeras.keys` (``grade_probs``, ``seg_probs`` / ``lesion_probs``, ...), with every
layer named, so the networks can be trained with ``fit``, exported as SavedModels and inspected
with Grad-CAM by layer name. Training algorithms that ``fit`` cannot express live in
:mod:`drkeras.training`.

Modules:
    blocks: building blocks shared by the builders (VGG16 encoder with ``keras.applications``
        layer names, mirrored transposed-convolution decoder, grading and segmentation heads,
        ImageNet weight loading with a clear offline error).
    mtunet: the VGG16-UNet multi-task network of Foo et al. 2020 (MTUnet, also the network of
        PLDMLT section 3.2), its variants A and B, the pixel-class sets and ``compile_mtunet``.
    baselines: the papers' comparison networks behind ``build_segmenter`` / ``build_grader``.
    collaborative: Zhou et al. 2019, the Xception-module U-Net lesion generator (and its
        plain-convolution variant), the adversarial discriminator and the lesion-attentive grader.
    ssl_gan: Lecouat et al. 2018, the weight-normalised patch discriminator and generator
        (Tables 3-4), the image scorer over the 8 x 8 patch grid, the ResNet baselines.
    cooperative: the cooperative-learning paper's residual inception blocks, shared encoder,
        classifier agent, segmentation agent with partial attention, FCN-8s and inception UNet.
    upsampling: ``NearestUpSampling2D``, nearest-neighbour upsampling whose gradient has
        deterministic GPU kernels, and ``replace_nearest_upsampling`` for the libraries'
        networks (segmentation-models' UNet, LinkNet and FPN decoders).
"""
