"""The ROS 2 layer of spatialoc_ros: message conversions and the nodes.

This is the only sub-package that imports rclpy and ROS message types. The nodes stay thin:
all inference lives in :mod:`spatialoc_ros.inference`, all data handling in
:mod:`spatialoc_ros.data`; the modules here convert messages and call them.

- :mod:`spatialoc_ros.ros.conversions`: pure functions (cells, point clouds, Gaussians,
  hypotheses and markers <-> messages).
- :mod:`spatialoc_ros.ros.instruction`: checks on an instruction text (ROS-free).
- :mod:`spatialoc_ros.ros.map_server_node`: the ``map_server`` node.
- :mod:`spatialoc_ros.ros.localizer_node`: the ``localizer`` node.
- :mod:`spatialoc_ros.ros.demo_client`: sends test instructions to a running localizer.
"""
