"""Confine the C++ toolchain that reads kernel text: Linux Landlock, set up per build.

Kernel text steers what the compiler, assembler and linker do (an attribute's string
reaches the assembler as directives; an object's sections can make the linker run the
compiler again with options of the object's choosing), so the text checks in safety.py
cannot be the boundary. Each toolchain step on kernel text runs in a child process that,
before it executes the tool, restricts itself (no_new_privs, then a Landlock domain):

- read and execute beneath the system's program and library directories and the tools'
  own installation prefixes, and the prepared runtime (headers, precompiled prelude);
- read, write, create and remove beneath the build's own directory, nothing else
  (its temporary files go there too: TMPDIR);
- /dev/null read and write, /dev/urandom and the loader's cache read;
- where the kernel's Landlock has them: no TCP bind or connect, no signals to processes
  outside the domain, no abstract Unix sockets.

The restriction is inherited by everything the tool runs (cc1plus, as, collect2, ld,
an LTO re-run) and cannot be lifted. Where Landlock is missing (Linux before 5.13, or
disabled), kernels are refused unless HLH_MLX_EMU_UNCONFINED_TOOLCHAIN=1 says the user
trusts every kernel text this process compiles.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from pathlib import Path

from .errors import EmulatorError

# syscall numbers are the same on every architecture Linux added Landlock to
_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1
_PR_SET_NO_NEW_PRIVS = 38

# filesystem rights (uapi/linux/landlock.h)
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_ABI_FS = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}  # REFER (2), TRUNCATE (3), IOCTL_DEV (5)
_TRUNCATE = 1 << 14
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1                 # ABI 4
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1      # ABI 6

READ_ONLY = EXECUTE | READ_FILE | READ_DIR
SYSTEM_DIRS = ("/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin")
SYSTEM_FILES = {"/dev/null": READ_FILE | WRITE_FILE, "/dev/urandom": READ_FILE, "/dev/zero": READ_FILE,
                "/etc/ld.so.cache": READ_FILE}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


@functools.lru_cache(maxsize=None)
def abi() -> int:
    """The Landlock ABI version this kernel offers, 0 where it has none."""
    if platform.system() != "Linux":
        return 0
    v = _libc.syscall(_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(int(v), 0)


def unconfined_allowed() -> bool:
    """HLH_MLX_EMU_UNCONFINED_TOOLCHAIN (read at each build: a process may set it late)."""
    return os.environ.get("HLH_MLX_EMU_UNCONFINED_TOOLCHAIN", "").strip().lower() not in ("", "0", "false", "no", "off")


def required() -> None:
    """Raise unless the toolchain can be confined (or the user opted out)."""
    if abi() < 1 and not unconfined_allowed():
        raise EmulatorError(
            "[emulator] this system cannot confine the C++ toolchain (Linux Landlock is missing or disabled), and "
            "kernel text can steer the compiler, assembler and linker into reading or writing your files: no kernel "
            "is compiled. On a Linux 5.13+ kernel with Landlock enabled this works as is; to compile anyway, only "
            "kernel text you trust (e.g. hlh_mlx's shipped templates), set HLH_MLX_EMU_UNCONFINED_TOOLCHAIN=1")


def _fs_rights(version: int) -> int:
    return _ABI_FS[max(k for k in _ABI_FS if k <= version)]


class Ruleset:
    """A Landlock ruleset for one build directory, made in the parent (cheap: a few system
    calls); `apply` runs in the child, after fork and before exec. Close it after the child
    has started (`with`)."""

    def __init__(self, build_dir: Path, readable: tuple[str, ...] = ()):
        self.fd = -1
        version = abi()
        if version < 1:
            return  # unconfined (required() decided it may be)
        fs = _fs_rights(version)
        attr = _RulesetAttr(fs, _NET_BIND_TCP | _NET_CONNECT_TCP if version >= 4 else 0,
                            _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL if version >= 6 else 0)
        size = 24 if version >= 6 else 16 if version >= 4 else 8
        fd = _libc.syscall(_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
        if fd < 0:
            raise EmulatorError(f"[emulator] could not make a Landlock ruleset: {os.strerror(ctypes.get_errno())}")
        self.fd = int(fd)
        try:
            file_rights = EXECUTE | READ_FILE | WRITE_FILE | (_TRUNCATE if version >= 3 else 0)
            for d in (*SYSTEM_DIRS, *readable):
                self._allow(d, READ_ONLY)
            for f, rights in SYSTEM_FILES.items():
                self._allow(f, rights & file_rights)
            self._allow(str(build_dir), fs, must_exist=True)
        except BaseException:
            self.close()
            raise

    def _allow(self, path: str, rights: int, must_exist: bool = False) -> None:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            if must_exist:
                raise
            return  # a directory this system does not have
        try:
            if not os.path.isdir(path):
                rights &= EXECUTE | READ_FILE | WRITE_FILE | _TRUNCATE  # what a rule on a file may hold
            rule = _PathBeneathAttr(rights, fd)
            if _libc.syscall(_ADD_RULE, ctypes.c_int(self.fd), ctypes.c_int(_RULE_PATH_BENEATH), ctypes.byref(rule),
                             ctypes.c_uint32(0)) < 0:
                raise EmulatorError(f"[emulator] could not add a Landlock rule for {path}: "
                                    f"{os.strerror(ctypes.get_errno())}")
        finally:
            os.close(fd)

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return (self.fd,) if self.fd >= 0 else ()

    def apply(self) -> None:
        """In the child: no new privileges, then the domain (or die: exec must not happen
        unconfined)."""
        if self.fd < 0:
            return
        if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
                _libc.syscall(_RESTRICT_SELF, ctypes.c_int(self.fd), ctypes.c_uint32(0)) != 0:
            os._exit(126)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@functools.lru_cache(maxsize=None)
def tool_prefixes(*tools: str) -> tuple[str, ...]:
    """The installation prefixes of these programs (a compiler outside /usr, e.g. in a
    Python environment or /opt), read-only to the confined steps; never `/` itself."""
    out = []
    for t in tools:
        real = Path(os.path.realpath(t))
        prefix = real.parent.parent if real.parent.name == "bin" else real.parent
        if Path.home().is_relative_to(prefix):  # ~/bin/g++: the home directory is no tool's prefix
            prefix = real.parent
        if str(prefix) != "/" and str(prefix) not in out:
            out.append(str(prefix))
    return tuple(out)
