"""fanotify mode: the kernel's EROFS mounted file-backed over the chunk cache's data files, whose holes a daemon
fills on demand from fanotify pre-content events (Linux >= 6.14 with CONFIG_FANOTIFY_ACCESS_PERMISSIONS)."""
