"""``zmachine-flist``: pack, inspect, ls, cat, unpack, mount, boot-mode, migrate-store, push,
fetch."""

from __future__ import annotations

import argparse
import os
import stat
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from controller.flist import bootmode, mount
from controller.flist.archive import pack_source
from controller.flist.cache import BlockCache
from controller.flist.errors import FlistError, StoreError
from controller.flist.fetch import fetch_flist
from controller.flist.meta import Entry, Flist, open_flist
from controller.flist.push import flist_name as _flist_name
from controller.flist.push import push
from controller.flist.stores import DirStore, Router, migrate_dir_store
from controller.flist.unpack import unpack
from controller.logs import configure_logging

DEFAULT_CACHE = Path(os.environ.get("ZMACHINE_FLIST_CACHE", "/var/cache/zmachine-flist"))


def _cache(flist: Flist, args: argparse.Namespace) -> BlockCache:
    specs = list(args.store) or flist.store_specs()
    if not specs:
        raise FlistError("no --store given and the flist names none", flist=flist.label)
    return BlockCache(Router.from_specs(specs, flist.label), args.cache, flist.label)


def _cmd_pack(args: argparse.Namespace) -> None:
    stats, image = pack_source(args.source, args.output, args.store, progress=not args.quiet)
    for key, value in sorted(image.tags().items()) if image else ():
        print(f"tag: {key}={value}")
    print(
        f"{args.output}: {stats.files} files, {stats.dirs} dirs, {stats.symlinks} symlinks,"
        f" {stats.hardlinks} hard links, {stats.specials} special; {stats.bytes} bytes in"
        f" {stats.blocks} blocks ({stats.blocks_written} written) in {stats.seconds:.2f}s"
        f" ({stats.mb_per_s:.1f} MB/s)"
    )


def _cmd_inspect(args: argparse.Namespace) -> None:
    with open_flist(args.flist, deep_check=True) as flist:
        kinds: dict[str, int] = {}
        for _, entry in flist.walk():
            name = _KIND_NAMES.get(entry.kind, "other")
            kinds[name] = kinds.get(name, 0) + 1
        print(f"flist: {flist.label}")
        print(f"format: {'v2 (rfs .fl)' if flist.version == 2 else 'v1 (0-fs .flist)'}")
        print(
            f"entries: {flist.count()}  " + "  ".join(f"{k}: {v}" for k, v in sorted(kinds.items()))
        )
        print(f"file bytes: {flist.total_size()}")
        print(f"hard links: {len(flist.hardlinks)}")
        for spec in flist.store_specs():
            print(f"store: {spec}")
        for key, value in sorted(flist.tags().items()):
            print(f"tag: {key}={value}")
        info = bootmode.detect(flist, Path("/"))
        print(f"boot mode: {info.mode}" + (f" kernel={info.kernel}" if info.kernel else ""))


_KIND_NAMES = {
    stat.S_IFDIR: "dirs",
    stat.S_IFREG: "files",
    stat.S_IFLNK: "symlinks",
    stat.S_IFBLK: "block devices",
    stat.S_IFCHR: "char devices",
    stat.S_IFIFO: "fifos",
    stat.S_IFSOCK: "sockets",
}


def _long(path: str, entry: Entry) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(entry.mtime))
    line = (
        f"{stat.filemode(entry.mode)} {entry.uid:>5} {entry.gid:>5} {entry.size:>12} {when} {path}"
    )
    if entry.target is not None:
        line += f" -> {entry.target.decode('utf-8', 'replace')}"
    return line


def _cmd_ls(args: argparse.Namespace) -> None:
    with open_flist(args.flist) as flist:
        base, entry = flist.resolve(args.path)
        if args.recursive:
            prefix = base.rstrip("/")
            items = [(p, e) for p, e in flist.walk() if p == base or p.startswith(prefix + "/")]
        elif entry.is_dir:
            items = [(f"{base.rstrip('/')}/{c.name}", c) for c in flist.children(entry.ino)]
        else:
            items = [(base, entry)]
        for path, item in items:
            print(_long(path, item) if args.long else path)


def _cmd_cat(args: argparse.Namespace) -> None:
    with open_flist(args.flist) as flist:
        path, entry = flist.resolve(args.path)
        if not entry.is_file:
            raise FlistError("not a regular file", flist=flist.label, path=args.path)
        cache = _cache(flist, args)
        try:
            out = sys.stdout.buffer
            for data in cache.file_chunks(flist.blocks(entry), entry.size, path):
                out.write(data)
            out.flush()
        finally:
            cache.close()


def _cmd_unpack(args: argparse.Namespace) -> None:
    with open_flist(args.flist) as flist:
        cache = _cache(flist, args)
        try:
            count = unpack(flist, cache, args.target)
        finally:
            cache.close()
    print(f"unpacked {count} entries into {args.target}", file=sys.stderr)


def _cmd_mount(args: argparse.Namespace) -> None:
    mount.serve(args.flist, args.mountpoint, args.cache, args.store)


def _cmd_boot_mode(args: argparse.Namespace) -> None:
    path: Path = args.source
    info = (
        bootmode.detect_boot_mode(path) if path.is_dir() else bootmode.detect_boot_mode_flist(path)
    )
    print(info.mode)
    for name in ("kernel", "initrd", "image"):
        value = getattr(info, name)
        if value is not None:
            print(f"{name}: {value}")


def _cmd_migrate_store(args: argparse.Namespace) -> None:
    parts = urlsplit(args.store)
    if parts.scheme != "dir":
        raise StoreError("only dir:// stores have a layout to migrate", path=args.store)
    stats = migrate_dir_store(DirStore(args.store).root)
    print(
        f"{args.store}: {stats.moved} blocks moved to the flat layout, {stats.duplicates}"
        f" duplicates removed, {stats.skipped} other files left in place"
    )


def _cmd_push(args: argparse.Namespace) -> None:
    token = os.environ.get("ZMACHINE_HUB_TOKEN", "")
    if args.token_file:
        token = args.token_file.read_text().strip()
    if not token:
        raise FlistError("push needs --token-file or ZMACHINE_HUB_TOKEN", flist=args.hub)
    name = args.name or _flist_name(args.file)
    result = push(args.file, args.hub, name, token, progress=not args.quiet)
    print(result["flist"])


def _cmd_fetch(args: argparse.Namespace) -> None:
    print(fetch_flist(args.url, args.cache))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zmachine-flist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def reader(name: str, help_text: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("flist", type=Path)
        return cmd

    def with_stores(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="block cache dir")
        cmd.add_argument(
            "--store",
            action="append",
            default=[],
            help="[xx-yy=]URL; overrides the stores recorded in the flist",
        )

    cmd = sub.add_parser(
        "pack",
        help="pack a directory, a root filesystem tar (.tar, .tar.gz, .tar.zst) or a container"
        " image (OCI layout directory or archive, docker save archive) into an rfs v2 .fl",
    )
    cmd.add_argument("source", type=Path)
    cmd.add_argument("-o", "--output", type=Path, required=True)
    cmd.add_argument("--store", "-s", action="append", required=True, help="[xx-yy=]URL")
    cmd.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    cmd.set_defaults(func=_cmd_pack)

    reader("inspect", "summary of an flist").set_defaults(func=_cmd_inspect)
    cmd = reader("ls", "list entries")
    cmd.add_argument("path", nargs="?", default="/")
    cmd.add_argument("-l", "--long", action="store_true")
    cmd.add_argument("-R", "--recursive", action="store_true")
    cmd.set_defaults(func=_cmd_ls)
    cmd = reader("cat", "write a file's content to stdout")
    cmd.add_argument("path")
    with_stores(cmd)
    cmd.set_defaults(func=_cmd_cat)
    cmd = reader("unpack", "recreate the tree in a directory")
    cmd.add_argument("target", type=Path)
    with_stores(cmd)
    cmd.set_defaults(func=_cmd_unpack)
    cmd = reader("mount", "serve read-only over FUSE in the foreground")
    cmd.add_argument("mountpoint", type=Path)
    with_stores(cmd)
    cmd.set_defaults(func=_cmd_mount)
    cmd = sub.add_parser("boot-mode", help="container, vm or image (flist file or directory)")
    cmd.add_argument("source", type=Path)
    cmd.set_defaults(func=_cmd_boot_mode)
    cmd = sub.add_parser(
        "migrate-store", help="move a dir:// store's blocks to the flat layout rfs v2.0.6 reads"
    )
    cmd.add_argument("store", help="dir:///path")
    cmd.set_defaults(func=_cmd_migrate_store)
    cmd = sub.add_parser("push", help="upload a tar or image archive to a zmachine-hub")
    cmd.add_argument("file", type=Path)
    cmd.add_argument("--hub", required=True, help="the hub's URL, e.g. https://hub.example")
    cmd.add_argument("--name", help="flist name (default: the file name without extensions)")
    cmd.add_argument("--token-file", type=Path, help="bearer token (else $ZMACHINE_HUB_TOKEN)")
    cmd.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    cmd.set_defaults(func=_cmd_push)
    cmd = sub.add_parser("fetch", help="download and verify an flist into the cache")
    cmd.add_argument("url")
    cmd.add_argument("--cache", type=Path, default=DEFAULT_CACHE / "flists")
    cmd.set_defaults(func=_cmd_fetch)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Logs go to stderr (stdout may carry file data); the mount server logs JSON for the agent.
    serving = args.command == "mount"
    configure_logging("INFO" if serving else "WARNING", json=serving)
    try:
        args.func(args)
    except FlistError as exc:
        print(f"zmachine-flist: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
