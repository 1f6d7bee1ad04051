"""The light federated MoE training loop used to compare alignment strategies end to end.

Needs the ``train`` extra (scikit-learn for the bundled digits data, matplotlib for the plots).
"""
