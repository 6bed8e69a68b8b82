"""SpatiaLoc text-to-position localisation for ROS 2 (KITTI360Pose-style maps).

The hand-written modules live here; when built with colcon they are merged with the
generated ``spatialoc_ros.msg`` / ``spatialoc_ros.srv`` packages of the install space.
"""
__path__ = __import__('pkgutil').extend_path(__path__, __name__)
__version__ = "0.1.0"
