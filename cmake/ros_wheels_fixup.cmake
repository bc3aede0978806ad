# For builds against the ROS 2 wheels from PyPI (the pip path and colcon alike): the wheels'
# exported CMake targets name the include folders of the machine they were built on
# (/opt/python/cp311-cp311/...); point them at this interpreter's headers and this numpy's
# headers instead. On a ROS install no target names such a folder and nothing changes.
execute_process(
  COMMAND "${Python3_EXECUTABLE}" -c "import sysconfig; print(sysconfig.get_paths()['include'])"
  OUTPUT_VARIABLE _vla_py_include OUTPUT_STRIP_TRAILING_WHITESPACE COMMAND_ERROR_IS_FATAL ANY)
execute_process(
  COMMAND "${Python3_EXECUTABLE}" -c "import numpy; print(numpy.get_include())"
  OUTPUT_VARIABLE _vla_np_include OUTPUT_STRIP_TRAILING_WHITESPACE COMMAND_ERROR_IS_FATAL ANY)
get_directory_property(_vla_imported IMPORTED_TARGETS)
foreach(_target IN LISTS _vla_imported)
  get_target_property(_dirs ${_target} INTERFACE_INCLUDE_DIRECTORIES)
  if(_dirs AND _dirs MATCHES "/opt/python/")
    list(TRANSFORM _dirs REPLACE "^/opt/python/[^/]+/lib/python3\\.[0-9]+/site-packages/numpy/_core/include$"
      "${_vla_np_include}")
    list(TRANSFORM _dirs REPLACE "^/opt/python/[^/]+/include/python3\\.[0-9]+$" "${_vla_py_include}")
    set_target_properties(${_target} PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${_dirs}")
  endif()
endforeach()
