"""Build an update bundle from the project's own source tree, offline.

``pip wheel`` / ``python -m build`` need the build backend named in ``pyproject.toml``
(setuptools >= 77 here) and therefore, with build isolation, the network. This project
is pure Python, so :func:`build_wheel` writes the wheel itself (PEP 427): the packages
selected by ``[tool.setuptools.packages.find] include``, ``METADATA`` from
``[project]`` (dependencies, extras, requires-python), ``entry_points.txt`` from
``[project.scripts]`` and a ``RECORD``. The version is patched in the wheel only (the
tree is not modified): ``METADATA`` and ``__version__ = "..."`` in
``agent/__init__.py``, so ``charger-agent --version`` of the installed release shows it.

:func:`build_bundle` wraps the wheel (or any prebuilt payload, e.g. a RAUC ``.raucb``)
with a manifest, signs the bundle file and writes ``<bundle>.sig``.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import tomllib
import zipfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.firmware.bundle import DEPS, Manifest, load_private_key, sha256_file, sign_file, write_bundle
from agent.utctime import to_iso, utc_now

# PEP 440 public versions plus a local label (what pip accepts in a wheel name)
PEP440 = re.compile(
    r"^([1-9][0-9]*!)?(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*((a|b|rc)(0|[1-9][0-9]*))?"
    r"(\.post(0|[1-9][0-9]*))?(\.dev(0|[1-9][0-9]*))?(\+[a-z0-9]+(\.[a-z0-9]+)*)?$"
)
VERSION_FILE = "agent/__init__.py"
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
SKIP_DIRS = {"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
SKIP_SUFFIXES = (".pyc", ".pyo", ".orig", ".rej", ".swp")


class BuildError(Exception):
    pass


@dataclass(frozen=True)
class BuildResult:
    bundle: Path
    sha256: str
    signature: str
    manifest: Manifest
    signature_file: Path

    def params(self, base_url: str | None = None) -> dict[str, Any]:
        """``firmware_upgrade`` params for this bundle (``url`` when ``base_url`` is given)."""
        out: dict[str, Any] = {
            "version": self.manifest.version,
            "checksum": self.sha256,
            "checksum_type": "sha256",
            "signature": self.signature,
        }
        if base_url is not None:
            out = {"url": base_url.rstrip("/") + "/" + self.bundle.name, **out}
        return out


def _norm_dist(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode("ascii")


def find_packages(source: Path, include: list[str]) -> list[str]:
    """Dotted names of the packages (dirs with ``__init__.py``) matching ``include``."""
    found: list[str] = []

    def walk(directory: Path, parts: tuple[str, ...]) -> None:
        dotted = ".".join(parts)
        if any(fnmatch.fnmatchcase(dotted, pat) for pat in include):
            found.append(dotted)
        for child in sorted(directory.iterdir()):
            if child.is_dir() and child.name.isidentifier() and (child / "__init__.py").is_file():
                walk(child, (*parts, child.name))

    for top in sorted(source.iterdir()):
        if top.is_dir() and top.name.isidentifier() and top.name not in SKIP_DIRS and (top / "__init__.py").is_file():
            walk(top, (top.name,))
    return found


def _metadata(project: dict[str, Any], version: str) -> str:
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {project['name']}",
        f"Version: {version}",
    ]
    if project.get("description"):
        lines.append(f"Summary: {project['description']}")
    if project.get("requires-python"):
        lines.append(f"Requires-Python: {project['requires-python']}")
    if isinstance(project.get("license"), str):
        lines.append(f"License: {project['license']}")
    for classifier in project.get("classifiers", []):
        lines.append(f"Classifier: {classifier}")
    for req in project.get("dependencies", []):
        lines.append(f"Requires-Dist: {req}")
    for extra, reqs in sorted((project.get("optional-dependencies") or {}).items()):
        lines.append(f"Provides-Extra: {extra}")
        for req in reqs:
            base, _, marker = req.partition(";")
            cond = f'({marker.strip()}) and extra == "{extra}"' if marker.strip() else f'extra == "{extra}"'
            lines.append(f"Requires-Dist: {base.strip()}; {cond}")
    return "\n".join(lines) + "\n"


def build_wheel(source: str | os.PathLike[str], out_dir: str | os.PathLike[str], version: str) -> Path:
    """Write ``<name>-<version>-py3-none-any.whl`` from the tree at ``source``; return its path."""
    src = Path(source).resolve()
    if not PEP440.match(version):
        raise BuildError(f"version {version!r} is not a PEP 440 version (e.g. 0.2.0, 0.2.0rc1, 0.2.0+site1)")
    try:
        pyproject = tomllib.loads((src / "pyproject.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise BuildError(f"{src}/pyproject.toml: {exc}") from None
    project = pyproject.get("project") or {}
    if not project.get("name"):
        raise BuildError("pyproject.toml: [project] name is missing")
    find = ((pyproject.get("tool") or {}).get("setuptools") or {}).get("packages", {}).get("find", {})
    packages = find_packages(src, list(find.get("include") or ["*"]))
    if not packages:
        raise BuildError(f"no packages found under {src}")
    dist = _norm_dist(project["name"])
    wheel_name = f"{dist}-{version.replace('-', '_')}-py3-none-any.whl"
    dist_info = f"{dist}-{version.replace('-', '_')}.dist-info"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / wheel_name
    record: list[str] = []
    version_patched = False

    def add(zf: zipfile.ZipFile, arcname: str, data: bytes, mode: int = 0o644) -> None:
        info = zipfile.ZipInfo(arcname, ZIP_EPOCH)
        info.external_attr = (0o100000 | mode) << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        zf.writestr(info, data)
        record.append(f"{arcname},{_record_hash(data)},{len(data)}")

    tmp = target.with_name(target.name + ".tmp")
    with zipfile.ZipFile(tmp, "w") as zf:
        for package in packages:
            pkg_dir = src / Path(*package.split("."))
            for path in sorted(pkg_dir.iterdir()):
                if not path.is_file() or path.name.endswith(SKIP_SUFFIXES) or path.name.startswith("."):
                    continue
                arcname = path.relative_to(src).as_posix()
                data = path.read_bytes()
                if arcname == VERSION_FILE:
                    data, n = re.subn(
                        rb'^__version__\s*=\s*["\'][^"\']*["\']', f'__version__ = "{version}"'.encode(), data, flags=re.M
                    )
                    version_patched = n == 1
                add(zf, arcname, data)
        add(zf, f"{dist_info}/METADATA", _metadata(project, version).encode("utf-8"))
        add(
            zf,
            f"{dist_info}/WHEEL",
            b"Wheel-Version: 1.0\nGenerator: charger-agent-build-bundle\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        scripts = project.get("scripts") or {}
        if scripts:
            body = "[console_scripts]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(scripts.items()))
            add(zf, f"{dist_info}/entry_points.txt", body.encode("utf-8"))
        top = sorted({p.split(".")[0] for p in packages})
        add(zf, f"{dist_info}/top_level.txt", ("\n".join(top) + "\n").encode("utf-8"))
        record.append(f"{dist_info}/RECORD,,")
        info = zipfile.ZipInfo(f"{dist_info}/RECORD", ZIP_EPOCH)
        info.external_attr = (0o100644) << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        zf.writestr(info, ("\n".join(record) + "\n").encode("utf-8"))
    if (src / VERSION_FILE).is_file() and not version_patched:
        tmp.unlink()
        raise BuildError(f"{VERSION_FILE}: no `__version__ = \"...\"` line to patch")
    os.replace(tmp, target)
    return target


def build_bundle(
    *,
    version: str,
    key: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    source: str | os.PathLike[str] | None = None,
    payload: str | os.PathLike[str] | None = None,
    deps: list[Path] | None = None,
    created_at: datetime | None = None,
) -> BuildResult:
    """Build (or take ``payload``), wrap, sign. Returns paths, sha256 and signature."""
    private = load_private_key(key)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = out / f".build-{version}"
    work.mkdir(exist_ok=True)
    if payload is None:
        if source is None:
            raise BuildError("either a source tree or a prebuilt payload is needed")
        payload_path = build_wheel(source, work, version)
        kind = "wheel"
    else:
        payload_path = Path(payload)
        if not payload_path.is_file():
            raise BuildError(f"payload {payload_path} not found")
        kind = "rauc" if payload_path.suffix == ".raucb" else "wheel"
    members: dict[str, Path] = {payload_path.name: payload_path}
    for dep in deps or []:
        members[f"{DEPS}/{dep.name}"] = dep
    files: dict[str, dict[str, Any]] = {
        name: {"sha256": sha256_file(p), "size": p.stat().st_size} for name, p in members.items()
    }
    when = created_at or utc_now()
    manifest = Manifest(
        version=version,
        created_at=to_iso(when),
        payload=payload_path.name,
        payload_sha256=str(files[payload_path.name]["sha256"]),
        payload_size=int(files[payload_path.name]["size"]),
        kind=kind,  # type: ignore[arg-type]
        files=files,
    )
    bundle = out / f"charger-agent-{version}.bundle.tar.gz"
    write_bundle(bundle, manifest, members)
    signature = sign_file(bundle, private)
    sig_file = bundle.with_name(bundle.name + ".sig")
    sig_file.write_text(signature + "\n", encoding="ascii")
    for leftover in work.iterdir():
        leftover.unlink()
    work.rmdir()
    return BuildResult(bundle=bundle, sha256=sha256_file(bundle), signature=signature, manifest=manifest, signature_file=sig_file)


def describe(result: BuildResult, base_url: str | None) -> str:
    params = result.params(base_url)
    return json.dumps(params, indent=2)
