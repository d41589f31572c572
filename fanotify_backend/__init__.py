"""fanotify mode: the kernel's EROFS mounted file-backed over the chunk cache's data files, whose holes a daemon fills
on demand from fanotify pre-content events.

``rafsfs mount SOURCE MNT --mode fanotify --config C`` (or ``auto``: fscache where the kernel has on-demand
cachefiles, else fanotify where :func:`.probe.unavailable_reason` finds nothing wrong, else FUSE; one log line says
which and why).  Needs root, Linux >= 6.14 with ``CONFIG_FANOTIFY_ACCESS_PERMISSIONS`` and file-backed EROFS
(``CONFIG_EROFS_FS_BACKED_BY_FILE``), and a cache directory on a filesystem that accepts pre-content marks (ext4,
xfs, btrfs; not tmpfs or overlayfs).  Metadata and cached data are served by the kernel alone; a blob whose chunks
are all in the cache carries no mark, so a cached image runs at kernel speed.

Processes (:mod:`.mount`): the mount session's process is the supervisor (group, before-mark descriptors, marks,
mount, API, prefetch); a forked worker reads events into a shared journal and fills them.  ``kill -9`` of the worker
at any moment: readers wait (never zeros) until the successor answers what was left.  Graceful stop (``rafsfs umount``,
SIGTERM) unmounts before the group closes.  If the supervisor itself dies, the kernel fails open (holes read as zeros):
``rafsfs mount`` and ``rafsfs stats`` then name the orphaned mount and how to recover (:mod:`.records`).

Modules: :mod:`.fanotify` (syscalls, constants, records), :mod:`.probe`, :mod:`.journal`, :mod:`.filler`,
:mod:`.mount` (supervisor and worker), :mod:`.runner` (the session's Runner), :mod:`.records` (mount records,
orphan check, sharing a data file between daemons).
"""
