"""vla_ros: OpenVLA on a real arm over ROS 2, with a safety limiter as the only path to the arm.

The generated message module ``vla_ros.msg`` is installed by rosidl next to (not inside) this
source tree on the pip path, so the package path is extended to every ``vla_ros`` folder on
``sys.path``; on a ROS install both land in the same folder and this is a no-op.
"""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
__version__ = '0.1.0'
