"""Training the small simulated-arm OpenVLA: demonstrations (``data``) and the trainer (``train``).

Nothing here is imported by the nodes; ``data`` needs numpy and the simulator, ``train`` torch.
"""
