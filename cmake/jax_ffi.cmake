# liboptkern_jax: XLA FFI handlers (csrc/jax/jax_ffi.cpp) over the C interface, loaded by optkern.jax.
#
# OPTKERN_JAX (cache variable or environment variable): AUTO builds it when jaxlib's FFI headers are found,
# ON requires them, OFF skips it.  The headers are looked up, in order, in
#   - OPTKERN_JAX_INCLUDE_DIR (cache or environment variable): a directory holding xla/ffi/api/ffi.h;
#   - the target environment's jax: `pip install .` builds in an isolated environment where jax is not importable,
#     so the interpreter is run with that isolation undone (PYTHONPATH and PYTHONNOUSERSITE unset: pip's build
#     isolation adds its environment through them), which imports the jax of the environment being installed into;
#   - the build interpreter as it is (a non-isolated build: --no-build-isolation, the dev build).
set(OPTKERN_JAX "AUTO" CACHE STRING "Build the JAX FFI library liboptkern_jax: AUTO, ON or OFF")
if(DEFINED ENV{OPTKERN_JAX} AND NOT "$ENV{OPTKERN_JAX}" STREQUAL "")
  set(OPTKERN_JAX "$ENV{OPTKERN_JAX}")
endif()
string(TOUPPER "${OPTKERN_JAX}" OPTKERN_JAX)
if(NOT OPTKERN_JAX MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "OPTKERN_JAX must be AUTO, ON or OFF, got '${OPTKERN_JAX}'")
endif()
set(OPTKERN_JAX_INCLUDE_DIR "" CACHE PATH "jaxlib's FFI include directory (holding xla/ffi/api/ffi.h)")
if(DEFINED ENV{OPTKERN_JAX_INCLUDE_DIR} AND NOT "$ENV{OPTKERN_JAX_INCLUDE_DIR}" STREQUAL "")
  set(OPTKERN_JAX_INCLUDE_DIR "$ENV{OPTKERN_JAX_INCLUDE_DIR}")
endif()

set(_optkern_jax_why "")
set(_optkern_jax_inc "")
if(OPTKERN_JAX STREQUAL "OFF")
  set(_optkern_jax_why "OPTKERN_JAX=OFF")
elseif(OPTKERN_JAX_INCLUDE_DIR)
  if(EXISTS "${OPTKERN_JAX_INCLUDE_DIR}/xla/ffi/api/ffi.h")
    set(_optkern_jax_inc "${OPTKERN_JAX_INCLUDE_DIR}")
    set(_optkern_jax_from "OPTKERN_JAX_INCLUDE_DIR")
  else()
    set(_optkern_jax_why "OPTKERN_JAX_INCLUDE_DIR=${OPTKERN_JAX_INCLUDE_DIR} has no xla/ffi/api/ffi.h")
  endif()
elseif(NOT OPTKERN_PYTHON)
  set(_optkern_jax_why "OPTKERN_PYTHON=OFF and no OPTKERN_JAX_INCLUDE_DIR")
else()
  if(NOT Python_EXECUTABLE)
    find_package(Python 3.9 COMPONENTS Interpreter)
  endif()
  set(_optkern_jax_probe "import jax.ffi; print(jax.ffi.include_dir())")
  # The target environment first (isolation undone), then the build interpreter as it is.
  execute_process(
    COMMAND ${CMAKE_COMMAND} -E env --unset=PYTHONPATH --unset=PYTHONNOUSERSITE ${Python_EXECUTABLE} -c
            "${_optkern_jax_probe}"
    OUTPUT_VARIABLE _optkern_jax_out ERROR_VARIABLE _optkern_jax_err RESULT_VARIABLE _optkern_jax_rc
    OUTPUT_STRIP_TRAILING_WHITESPACE)
  set(_optkern_jax_from "the target environment's jax (${Python_EXECUTABLE}, build isolation undone)")
  if(NOT _optkern_jax_rc EQUAL 0)
    execute_process(COMMAND ${Python_EXECUTABLE} -c "${_optkern_jax_probe}"
                    OUTPUT_VARIABLE _optkern_jax_out ERROR_VARIABLE _optkern_jax_err2
                    RESULT_VARIABLE _optkern_jax_rc OUTPUT_STRIP_TRAILING_WHITESPACE)
    set(_optkern_jax_from "the build interpreter's jax (${Python_EXECUTABLE})")
  endif()
  if(_optkern_jax_rc EQUAL 0 AND EXISTS "${_optkern_jax_out}/xla/ffi/api/ffi.h")
    set(_optkern_jax_inc "${_optkern_jax_out}")
  else()
    string(REGEX MATCH "[A-Za-z]*Error: [^\n]*" _optkern_jax_msg "${_optkern_jax_err}")
    set(_optkern_jax_why "jax is not importable by ${Python_EXECUTABLE} (${_optkern_jax_msg}); install jax first or set OPTKERN_JAX_INCLUDE_DIR")
  endif()
endif()

if(_optkern_jax_inc)
  add_library(optkern_jax SHARED csrc/jax/jax_ffi.cpp)
  # XLA's FFI headers are third-party (SYSTEM: their warnings are not ours).
  target_include_directories(optkern_jax SYSTEM PRIVATE "${_optkern_jax_inc}")
  target_link_libraries(optkern_jax PRIVATE optkern_shared)
  target_compile_options(optkern_jax PRIVATE -O2 -Wall -Wextra)
  target_link_options(optkern_jax PRIVATE -Wl,--no-undefined)
  set_target_properties(optkern_jax PROPERTIES INSTALL_RPATH "$ORIGIN")
  install(TARGETS optkern_jax LIBRARY DESTINATION ${OPTKERN_INSTALL_LIBDIR})
  message(STATUS "optkern: JAX FFI library (liboptkern_jax) ON: XLA FFI headers ${_optkern_jax_inc}, from ${_optkern_jax_from}")
elseif(OPTKERN_JAX STREQUAL "ON")
  message(FATAL_ERROR "OPTKERN_JAX=ON but the JAX FFI library cannot be built: ${_optkern_jax_why}")
else()
  message(STATUS "optkern: JAX FFI library (liboptkern_jax) OFF: ${_optkern_jax_why}")
endif()
