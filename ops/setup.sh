#!/usr/bin/env bash
# Creates or reuses the adacode virtualenv and installs the project into it (editable, with the
# dev extra). Idempotent: when every requirement in pyproject.toml is already met and the editable
# install points at this checkout, pip is not run at all.
#
#   ops/setup.sh
#
# Environment:
#   ADACODE_VENV         virtualenv path (default ~/.cache/adacode/venv); <repo>/.venv links to it
#   ADACODE_PYTHON       interpreter that creates it (default python3.11)
#   ADACODE_TORCH_INDEX  optional pip index for the first torch install, e.g.
#                        https://download.pytorch.org/whl/cpu (a CPU-only wheel, far smaller)
set -euo pipefail

readonly SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly REPO_DIR="$(cd "${SCRIPT_DIR}/.." && pwd)"
readonly VENV="${ADACODE_VENV:-${HOME}/.cache/adacode/venv}"
readonly BASE_PYTHON="${ADACODE_PYTHON:-python3.11}"
readonly PY="${VENV}/bin/python"
readonly STAMP="${VENV}/.adacode-setup"

die() {
    echo "setup.sh: $1" >&2
    exit 1
}

if (($# > 0)); then
    echo "setup.sh: takes no arguments (got '$*'); configure it with ADACODE_VENV, ADACODE_PYTHON, ADACODE_TORCH_INDEX" >&2
    exit 2
fi

# ---------------------------------------------------------------- the virtualenv
if [[ -x "${PY}" ]]; then
    "${PY}" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' ||
        die "${VENV} exists but is not a Python 3.11 virtualenv ($("${PY}" -V 2>&1)); remove it or set ADACODE_VENV to another path"
    echo "reusing virtualenv ${VENV} ($("${PY}" -V 2>&1))"
else
    if [[ -e "${VENV}" ]] && [[ -n "$(ls -A "${VENV}" 2>/dev/null)" ]]; then
        die "${VENV} exists but holds no bin/python; remove it or set ADACODE_VENV to another path"
    fi
    command -v "${BASE_PYTHON}" >/dev/null ||
        die "${BASE_PYTHON} not found on PATH; install Python 3.11 or set ADACODE_PYTHON to a 3.11 interpreter"
    "${BASE_PYTHON}" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' ||
        die "${BASE_PYTHON} is $("${BASE_PYTHON}" -V 2>&1), adacode needs 3.11; set ADACODE_PYTHON to a 3.11 interpreter"
    echo "creating virtualenv ${VENV} with ${BASE_PYTHON}"
    mkdir -p "$(dirname "${VENV}")"
    "${BASE_PYTHON}" -m venv "${VENV}" || die "could not create the virtualenv at ${VENV} (see above); on Debian/Ubuntu install python3.11-venv"
    "${PY}" -m pip install --quiet --upgrade pip "setuptools>=68" wheel ||
        die "could not install pip/setuptools/wheel into ${VENV}; check network access to PyPI"
fi

# ---------------------------------------------------------------- the project
# Exit 0 when pyproject's requirements (with the dev extra) are all met, the project is installed
# editable from this checkout, and pyproject.toml has not changed since the last install.
deps_satisfied() {
    "${PY}" - "${REPO_DIR}" "${STAMP}" <<'EOF'
import hashlib
import json
import sys
import tomllib
from importlib import metadata
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # a bare venv: pip vendors packaging
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]

repo, stamp = Path(sys.argv[1]), Path(sys.argv[2])
raw = (repo / "pyproject.toml").read_bytes()
want_stamp = f"{repo}\n{hashlib.sha256(raw).hexdigest()}\n"
if not stamp.is_file() or stamp.read_text() != want_stamp:
    print("pyproject.toml changed or never installed from this checkout")
    sys.exit(1)
project = tomllib.loads(raw.decode())["project"]
try:
    dist = metadata.distribution(project["name"])
    url = json.loads(dist.read_text("direct_url.json") or "{}")
except metadata.PackageNotFoundError:
    print(f"{project['name']} not installed")
    sys.exit(1)
if not (url.get("dir_info", {}).get("editable") and url.get("url") == repo.as_uri()):
    print(f"{project['name']} is not an editable install of {repo}")
    sys.exit(1)
for spec in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
    req = Requirement(spec)
    if req.marker is not None and not req.marker.evaluate():
        continue
    try:
        have = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        print(f"missing {req.name}")
        sys.exit(1)
    if not req.specifier.contains(have, prereleases=True):
        print(f"{req.name} {have} does not satisfy {spec}")
        sys.exit(1)
EOF
}

if reason="$(deps_satisfied 2>&1)"; then
    echo "adacode and its dependencies already installed in ${VENV}; pip not run"
else
    echo "installing adacode into ${VENV} (${reason})"
    if [[ -n "${ADACODE_TORCH_INDEX:-}" ]] && ! "${PY}" -c 'import torch' 2>/dev/null; then
        echo "installing torch from ${ADACODE_TORCH_INDEX}"
        "${PY}" -m pip install --index-url "${ADACODE_TORCH_INDEX}" "torch>=2.4,<3" ||
            die "could not install torch from ${ADACODE_TORCH_INDEX}; unset ADACODE_TORCH_INDEX to take it from PyPI"
    fi
    # The build backend (setuptools) lives in the venv, so skip pip's isolated build env: faster,
    # and it works without reaching an index once the dependencies are present.
    "${PY}" -c 'import setuptools, wheel' 2>/dev/null ||
        "${PY}" -m pip install --quiet "setuptools>=68" wheel ||
        die "could not install setuptools/wheel into ${VENV}; check network access to PyPI"
    "${PY}" -m pip install --upgrade-strategy only-if-needed --no-build-isolation \
        -e "${REPO_DIR}[dev]" ||
        die "pip install -e '${REPO_DIR}[dev]' failed (see above); fix the error it names and rerun ops/setup.sh"
    "${PY}" - "${REPO_DIR}" "${STAMP}" <<'EOF'
import hashlib
import sys
from pathlib import Path

repo, stamp = Path(sys.argv[1]), Path(sys.argv[2])
digest = hashlib.sha256((repo / "pyproject.toml").read_bytes()).hexdigest()
stamp.write_text(f"{repo}\n{digest}\n")
EOF
    reason="$(deps_satisfied 2>&1)" ||
        die "pip finished but the requirements are still not met: ${reason}"
    echo "installed adacode (editable) into ${VENV}"
fi

# ---------------------------------------------------------------- <repo>/.venv
link="${REPO_DIR}/.venv"
if [[ -L "${link}" ]]; then
    if [[ "$(readlink "${link}")" == "${VENV}" ]]; then
        echo "${link} -> ${VENV} (unchanged)"
    else
        ln -sfn "${VENV}" "${link}"
        echo "${link} -> ${VENV} (re-pointed)"
    fi
elif [[ -e "${link}" ]]; then
    echo "warning: ${link} is a real directory, not a link; left as is (remove it to link ${VENV} there)" >&2
else
    ln -s "${VENV}" "${link}"
    echo "${link} -> ${VENV} (created)"
fi
