"""ROS-free, torch-free logic that must be right: actions, statistics, images, prompt, safety.

Nothing in this package imports rclpy or torch, so it is unit-tested without a ROS graph.
"""
