"""Explanations of drkeras networks.

:mod:`drkeras.explain.gradcam` computes batched Grad-CAM maps (Selvaraju et al. 2017) for any class
of any functional Keras model in drkeras: single-output graders and dict-output multi-task
networks alike. PLDMLT (section 3.1, Eq. 1) uses them to check pseudo grades against lesion masks
(:mod:`drkeras.pseudo_grades`) and to draw its Fig. 6.
"""
