"""rclpy adapters, one file per node: parameters -> core object -> publishers."""
