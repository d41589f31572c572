"""The daemon's mount table: which images it serves, under which (volume, fsid), and when an image may be closed.

Two ways in, one table: ``mount`` (``rafsfs mount --mode fscache``: the daemon picks an fsid and mounts EROFS
itself) and ``bind`` (nydusd's ``PUT /api/v2/blobs``: the caller names the fsid and domain and mounts EROFS itself).
Either way the kernel's OPENs find the image here by volume and cookie key, and READs go through the same cache
objects.  An image that leaves the table is *retired*: kept open while a cache object may still read through it.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
from collections.abc import Callable

import trio

from rafsfs.blob import BlobInfo
from rafsfs.errors import BadImage, RafsError

from . import mount as fsmount
from . import state
from .errors import FscacheError
from .served import ServedImage, close_served, open_served
from .settings import Settings
from .state import MountRecord

log = logging.getLogger(__name__)

SYSFS_NAME_MAX = 36  # the kernel's sysfs name of an fscache-mode EROFS mount, "<domain>,<fsid>", cut here
FSID_ATTEMPTS = 8  # fsids tried for one mount when the kernel says the name is taken
MAX_KEY = 240  # characters of an fsid or domain bound over the API (the kernel's keys are at most 255 bytes)


class NotBound(FscacheError):
    """An unbind names an entry the daemon does not have (nydusd: "cache entry not found")."""


def _check_key(what: str, value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_KEY or \
            not all(c.isalnum() or c in "-_." for c in value):
        raise FscacheError(f"{what} {str(value)[:80]!r}: expected up to {MAX_KEY} letters, digits, '-', '_' or '.'")
    return value


class MountTable:
    def __init__(self, settings: Settings, metrics, needed: Callable[[], set[tuple[str, str]]]):
        """``needed()``: the (volume, cookie key) of every cache object still open or draining."""
        self.settings = settings
        self.metrics = metrics
        self.needed = needed
        self.mounts: dict[str, ServedImage] = {}
        self.mounting: set[str] = set()
        self.retired: list[ServedImage] = []  # out of the table, kept while a cache object may still read through it
        self.had_mounts = False
        self.stats: dict = {}

    # ------------------------------------------------------------------ lookups
    def lookup(self, volume: str, cookie: str) -> tuple[str, ServedImage, BlobInfo | None]:
        """(kind, an image that has it, the blob); KeyError for a cookie we do not serve."""
        s = self.mounts.get(cookie)
        if s is not None and s.rec.volume_key == volume:
            return "bootstrap", s, None
        for s in list(self.mounts.values()) + self.retired:
            if s.rec.volume_key != volume or s.bootstrap_fd < 0:
                continue
            for b in s.image.blobs:
                if b.blob_id == cookie:
                    return "blob", s, b
        raise KeyError(cookie)

    def status(self) -> list[dict]:
        return [{"fsid": f, "mountpoint": s.rec.mountpoint, "bootstrap": s.rec.bootstrap, "bound": s.rec.bound,
                 "domain_id": s.rec.domain_id, "blobs": [b.blob_id for b in s.image.blobs]}
                for f, s in self.mounts.items()]

    def in_use(self, key: str) -> bool:
        """Does any image in the table use ``key`` as its fsid or as a blob id?"""
        return key in self.mounts or any(b.blob_id == key for s in self.mounts.values() for b in s.image.blobs)

    # ------------------------------------------------------------------ restore
    async def load_records(self) -> None:
        """A daemon restarted after a crash serves what its predecessor served (the kernel re-OPENs by key)."""
        for rec in state.load_all(self.settings.mounts_dir):
            try:
                self.mounts[rec.fsid] = await trio.to_thread.run_sync(open_served, rec, self.metrics)
                self.had_mounts = True
            except RafsError as e:
                log.error("cannot serve %s (fsid %s) any more: %s", rec.mountpoint or rec.bootstrap, rec.fsid, e)

    # ------------------------------------------------------------------ sharing rule
    def check_sharing(self, served: ServedImage) -> None:
        """A blob is one cache object per volume, filled through whichever image has it: a new image may name a
        blob already served in its volume only if its chunk table and backend agree with that image's."""
        for b in served.image.blobs:
            mine = served.blob_identity(b)
            for other in list(self.mounts.values()) + self.retired:
                if other is served or other.closed or other.rec.volume_key != served.rec.volume_key:
                    continue
                for ob in other.image.blobs:
                    if ob.blob_id == b.blob_id and other.blob_identity(ob) != mine:
                        where = other.rec.mountpoint or f"fsid {other.rec.fsid}"
                        raise FscacheError(
                            f"{served.rec.bootstrap}: blob {b.blob_id} is already served in domain "
                            f"{served.rec.domain_id or served.rec.fsid} for {where} with another chunk table or "
                            "backend; use another domain for this image")

    def _retire(self, served: ServedImage) -> None:
        if served not in self.retired:
            self.retired.append(served)
        self.prune_retired()

    # ------------------------------------------------------------------ rafsfs mount
    async def mount(self, req: dict) -> dict:
        rec = MountRecord(fsid="", domain_id=self.settings.domain_id, bootstrap=os.path.realpath(req["bootstrap"]),
                          mountpoint=os.path.realpath(req["mountpoint"]), blob_dir=req.get("blob_dir"),
                          devices=list(req.get("devices") or []), config=req.get("config"),
                          prefetch_files=list(req.get("prefetch_files") or []))
        if self.settings.singleton:
            raise FscacheError("this daemon serves images bound over its API (PUT /api/v2/blobs), not mounts")
        if not os.path.isdir(rec.mountpoint):
            raise FscacheError(f"mountpoint {rec.mountpoint} is not a directory")
        if fsmount.is_mountpoint(rec.mountpoint):
            raise FscacheError(f"mountpoint {rec.mountpoint} is busy: something is already mounted there")
        content_id = await trio.to_thread.run_sync(content_id_of, rec.bootstrap)
        live = set(await trio.to_thread.run_sync(fsmount.mounted_fsids))
        served = await trio.to_thread.run_sync(open_served, rec, self.metrics)
        try:
            self.check_sharing(served)
            for attempt in range(FSID_ATTEMPTS):
                rec.fsid = self.unique_fsid(content_id, live)
                self.mounting.add(rec.fsid)  # reserved before the next await: a concurrent mount picks another
                self.mounts[rec.fsid] = served
                try:
                    state.save(self.settings.mounts_dir, rec)
                    await trio.to_thread.run_sync(fsmount.mount, rec)
                    break
                except OSError as e:
                    self.mounts.pop(rec.fsid, None)
                    state.remove(self.settings.mounts_dir, rec.fsid)
                    if e.errno == errno.EEXIST and attempt + 1 < FSID_ATTEMPTS:
                        # the domain still holds this fsid (an image unmounted moments ago, another daemon's
                        # mount): the next name will do
                        log.info("fsid %s is taken in domain %s: trying another", rec.fsid, rec.domain_id)
                        live.add(rec.fsid)
                        continue
                    raise FscacheError(f"mount of {rec.bootstrap} on {rec.mountpoint} failed: "
                                       f"{e.strerror} (see dmesg)") from None
                finally:
                    self.mounting.discard(rec.fsid)
        except BaseException:
            # READs of a blob it shares with another mount may be using it right now: retired, it is closed
            # once nobody is
            if self.mounts.get(rec.fsid) is served:
                self.mounts.pop(rec.fsid)
                state.remove(self.settings.mounts_dir, rec.fsid)
            self._retire(served)
            raise
        self.had_mounts = True
        log.info("mounted %s on %s (fsid %s, domain %s)", rec.bootstrap, rec.mountpoint, rec.fsid, rec.domain_id)
        return {"fsid": rec.fsid, "mountpoint": rec.mountpoint}

    def unique_fsid(self, base: str, live: set[str] | list[str]) -> str:
        """``base``, or for a second, third... mount of the same bootstrap ``base`` cut short + ``-N``: not used by
        our mounts, mounts being set up, or any EROFS mount of the system.  The kernel names each mount in sysfs
        ``<domain>,<fsid>`` cut to 36 characters (``s_sysfs_name``) and refuses a second mount with the same
        name (EEXIST), so names must differ within that length."""
        keep = SYSFS_NAME_MAX - (len(self.settings.domain_id) + 1 if self.settings.domain_id else 0)
        if keep < 8:
            raise FscacheError(f"domain id {self.settings.domain_id!r} is too long for the kernel's mount names")
        taken = {f[:keep] for f in (*self.mounts, *self.mounting, *live)}
        fsid, n = base, 1
        while fsid[:keep] in taken:
            n += 1
            if n > 10 ** (keep - 2):
                raise FscacheError(f"no free fsid for another mount of {base}")
            fsid = f"{base[:keep - len(str(n)) - 1]}-{n}"
        return fsid

    # ------------------------------------------------------------------ the nydusd API (singleton)
    async def bind(self, req: dict) -> dict:
        """Serve the image ``req["bootstrap"]`` as cookie ``req["id"]`` in volume ``erofs,<domain_id>``; its blobs
        as cookies named by their ids.  A replay of a binding the table has (the snapshotter restarting a dead
        daemon, or retrying) is accepted as it is."""
        fsid = _check_key("id", req.get("id"))
        domain = _check_key("domain_id", req.get("domain_id") or fsid)
        rec = MountRecord(fsid=fsid, domain_id=domain, bootstrap=os.path.realpath(req["bootstrap"]), mountpoint="",
                          config=req.get("config"), bound=True,
                          prefetch_files=list(req.get("prefetch_files") or []))
        old = self.mounts.get(fsid)
        if old is not None:
            if old.rec.bound and old.rec.domain_id == domain and old.rec.bootstrap == rec.bootstrap:
                log.info("image %s is already bound in domain %s: nothing to do", fsid, domain)
                return {"fsid": fsid, "blobs": [b.blob_id for b in old.image.blobs], "replayed": True}
            raise FscacheError(f"id {fsid} is already bound (domain {old.rec.domain_id}, {old.rec.bootstrap})")
        served = await trio.to_thread.run_sync(open_served, rec, self.metrics)
        if fsid in self.mounts:  # a concurrent bind of the same id won while the image was opened
            close_served(served)
            return await self.bind(req)
        try:
            self.check_sharing(served)
        except BaseException:
            close_served(served)  # never in the table: nothing reads through it
            raise
        self.mounts[fsid] = served
        state.save(self.settings.mounts_dir, rec)
        self.had_mounts = True
        blobs = [b.blob_id for b in served.image.blobs]
        log.info("bound %s as %s in domain %s (%d blob(s))", rec.bootstrap, fsid, domain, len(blobs))
        self.stats["binds"] = self.stats.get("binds", 0) + 1
        return {"fsid": fsid, "blobs": blobs}

    def unbind(self, domain_id: str, blob_id: str | None) -> dict:
        """nydusd's ``DELETE /api/v2/blobs?domain_id=D[&blob_id=X]``: without ``blob_id`` every image bound in the
        domain, with it the image bound as ``X`` (its blobs go with it).  NotBound when there is none."""
        volume = f"erofs,{domain_id}"
        victims = [f for f, s in self.mounts.items()
                   if s.rec.bound and s.rec.volume_key == volume and (blob_id is None or f == blob_id)]
        if not victims:
            raise NotBound(f"DeleteBlobObject(BlobCacheObjectId {{ domain_id: {domain_id!r}, blob_id: "
                           f"{blob_id or ''!r} }}): blob_cache: cache entry not found")
        for f in victims:
            self.forget(f)
            log.info("unbound %s from domain %s", f, domain_id)
        return {"unbound": victims}

    # ------------------------------------------------------------------ leaving the table
    def forget(self, fsid: str) -> None:
        s = self.mounts.pop(fsid, None)
        state.remove(self.settings.mounts_dir, fsid)
        if s is not None and s.rec.bound and s.rec.config and \
                os.path.dirname(s.rec.config) == self.settings.images_dir:
            try:
                os.unlink(s.rec.config)  # written for this binding by the API front end (it may hold credentials)
            except FileNotFoundError:
                pass
        if s is not None:
            self._retire(s)  # cache objects of its blobs may still be served through it

    def prune_retired(self) -> None:
        """Close the retired images that no open cache object needs any more: a blob object is served through a
        live image that has the blob if there is one, else through a retired one."""
        if not self.retired:
            return
        live = {(m.rec.volume_key, b.blob_id) for m in self.mounts.values() for b in m.image.blobs}
        needed = self.needed() - live
        keep = []
        for s in self.retired:
            if s.users or any((s.rec.volume_key, k) in needed
                              for k in (s.rec.fsid, *(b.blob_id for b in s.image.blobs))):
                keep.append(s)
            else:
                close_served(s)
        self.retired = keep
        self.stats["retired_mounts"] = len(keep)

    def release(self, s: ServedImage) -> None:
        """A READ or read-ahead through ``s`` is over."""
        s.users -= 1
        if s.users == 0 and s in self.retired:
            self.prune_retired()

    def check_mounts(self) -> bool:
        """Forget our mounts that were unmounted; True when the daemon has nothing left to serve (never for a
        singleton: the snapshotter binds more images later)."""
        live = fsmount.mounted_fsids()
        for fsid in [f for f, s in self.mounts.items()
                     if not s.rec.bound and f not in live and f not in self.mounting]:
            log.info("%s (fsid %s) was unmounted", self.mounts[fsid].rec.mountpoint, fsid)
            self.forget(fsid)
        return not self.settings.singleton and self.had_mounts and not self.mounts and not self.mounting

    async def unmount_all(self) -> None:
        """Unmount what this daemon mounted (bound images are the caller's to unmount)."""
        for fsid, s in list(self.mounts.items()):
            if s.rec.bound:
                continue
            try:
                await trio.to_thread.run_sync(fsmount.umount, s.rec.mountpoint)
            except OSError as e:
                if e.errno == errno.EBUSY:
                    log.warning("%s is busy: detaching it lazily", s.rec.mountpoint)
                    await trio.to_thread.run_sync(fsmount.umount, s.rec.mountpoint, True)
                elif e.errno != errno.EINVAL:  # EINVAL: not mounted any more
                    log.error("cannot unmount %s: %s", s.rec.mountpoint, e.strerror)
            self.forget(fsid)
            log.info("unmounted %s", s.rec.mountpoint)

    def close_all(self) -> None:
        for s in list(self.mounts.values()) + self.retired:
            close_served(s)


def content_id_of(bootstrap: str) -> str:
    """The base of a mount's fsid: derived from the bootstrap's bytes, so that a cached bootstrap file is reused
    only for identical bytes."""
    h = hashlib.sha256()
    try:
        with open(bootstrap, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as e:
        raise BadImage(f"cannot read image {bootstrap}: {e.strerror}") from None
    return h.hexdigest()[:40]
