"""A simulated 7-DoF arm and table-top camera scene, for demos and closed-loop tests."""
