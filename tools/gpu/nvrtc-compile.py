"""Compiles a CUDA source file with NVRTC, as the CUDA build does at run time, and fails with
NVRTC's log if it does not compile.

    python3 tools/gpu/nvrtc-compile.py LIBNVRTC SOURCE [NVRTC option ...]

LIBNVRTC is the path of libnvrtc.so.*; its builtins library must be loadable (LD_LIBRARY_PATH).
Prints the number of kernels (`.entry` lines) in the PTX it made.
"""
import ctypes
import sys


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    lib = ctypes.CDLL(sys.argv[1])
    path = sys.argv[2]
    with open(path, "rb") as f:
        source = f.read()
    options = [o.encode() for o in sys.argv[3:]]
    program = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(program), source, path.encode(), 0, None, None)
    if rc != 0:
        print(f"{path}: nvrtcCreateProgram failed with code {rc}", file=sys.stderr)
        return 1
    rc = lib.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(program, log)
    if rc != 0 or log.value.strip():
        print(f"{path} {' '.join(sys.argv[3:])}: NVRTC code {rc}\n{log.value.decode()}", file=sys.stderr)
        return 1
    lib.nvrtcGetPTXSize(program, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(program, ptx)
    entries = ptx.value.decode().count(".entry")
    print(f"{path} {' '.join(sys.argv[3:])}: {entries} kernels")
    return 0 if entries > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
