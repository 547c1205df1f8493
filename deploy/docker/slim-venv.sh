#!/bin/sh
# Shrink the service venv of a build stage before the runtime stage copies it:
#   - no installer (pip, setuptools, wheel): the runtime image installs nothing;
#   - no bundled test suites, C headers, Cython sources or type stubs of third-party packages (never
#     imported at run time);
#   - pyarrow without Arrow Flight, S3, GCS, Azure, HDFS and ORC (~52 MB; no service loads them, and
#     pyarrow.fs / pyarrow.dataset treat the missing modules as "built without"; Substrait stays:
#     pyarrow.lib links it); numpy without its build tools (f2py, distutils) and SIMD test module;
#   - no debug symbols in the shared libraries that carry them (infomap's wheel: ~75 MB of them);
#   - identical copies of a shared library (wheels cannot hold symlinks) become hard links.
# Usage (build stage, as root): sh deploy/docker/slim-venv.sh /opt/venv
set -eu
venv="${1:-/opt/venv}"
"$venv/bin/python" -m pip uninstall -y -q pip setuptools wheel >/dev/null 2>&1 || true
site="$(echo "$venv"/lib/python3*/site-packages)"
[ -d "$site" ] || { echo "slim-venv: no site-packages under $venv" >&2; exit 1; }

# Test suites and headers inside packages (site-packages/<pkg>/.../tests), not packages named so.
find "$site" -mindepth 2 -depth -type d -name tests -exec rm -rf {} +
for headers in pyarrow/include pyarrow/src numpy/_core/include numpy/core/include; do
  rm -rf "${site:?}/$headers"
done
find "$site" -mindepth 2 -type f \( -name '*.pyx' -o -name '*.pxd' -o -name '*.pxi' -o -name '*.pyi' \) -delete
# numpy's build tools (f2py, distutils: imported only when asked for) and its SIMD test module.
rm -rf "${site:?}/numpy/f2py" "${site:?}/numpy/distutils"
rm -f "$site"/numpy/_core/_simd.*.so
"$venv/bin/python" -c 'import numpy' || { echo "slim-venv: numpy no longer imports" >&2; exit 1; }
if [ -d "$site/pyarrow" ]; then
  # ORC and HDFS too: pyarrow.dataset and pyarrow.fs treat them as "built without" when absent.
  rm -f "$site"/pyarrow/_flight.*.so "$site"/pyarrow/libarrow_flight.so* "$site"/pyarrow/libarrow_python_flight.so* \
        "$site"/pyarrow/_s3fs.*.so "$site"/pyarrow/libarrow_s3.so* "$site"/pyarrow/_pyarrow_cpp_tests.*.so \
        "$site"/pyarrow/_gcsfs.*.so "$site"/pyarrow/_azurefs.*.so "$site"/pyarrow/_orc.*.so \
        "$site"/pyarrow/_dataset_orc.*.so "$site"/pyarrow/_hdfs.*.so
  # What the services use must still import (pyarrow.fs treats the missing ones as "built without";
  # pyarrow.lib itself links libarrow_substrait, which is why that one stays).
  "$venv/bin/python" -c 'import pyarrow, pyarrow.parquet, pyarrow.fs, pyarrow.dataset, pyarrow.compute' \
    || { echo "slim-venv: pyarrow no longer imports" >&2; exit 1; }
fi

# Only libraries that carry debug sections: rewriting the others gains nothing, and strip breaks
# the vendored libraries auditwheel patched (numpy.libs/*openblas*: "ELF load command not
# page-aligned").
if command -v strip >/dev/null 2>&1 && command -v readelf >/dev/null 2>&1; then
  find "$site" -type f -name '*.so*' | while IFS= read -r lib; do
    if readelf -S --wide "$lib" 2>/dev/null | grep -q ' \.debug_info'; then
      strip --strip-debug "$lib" && echo "slim-venv: stripped debug symbols of ${lib#"$site"/}"
    fi
  done
else
  echo "slim-venv: strip/readelf not found; shared libraries keep their debug symbols" >&2
fi

# libfoo.so, libfoo.so.N and libfoo.so.N.M shipped as three equal files: keep one, link the rest.
"$venv/bin/python" - "$site" <<'EOF'
import hashlib, os, sys
from collections import defaultdict

groups = defaultdict(list)
for root, _dirs, files in os.walk(sys.argv[1]):
    for name in files:
        path = os.path.join(root, name)
        if ".so" in name and not os.path.islink(path):
            groups[(root, os.path.getsize(path))].append(path)
saved = 0
for paths in groups.values():
    if len(paths) < 2:
        continue
    by_digest = defaultdict(list)
    for path in paths:
        with open(path, "rb") as fh:
            by_digest[hashlib.sha256(fh.read()).hexdigest()].append(path)
    for same in by_digest.values():
        keep = sorted(same)[0]
        for path in same:
            if path != keep and os.stat(path).st_ino != os.stat(keep).st_ino:
                os.remove(path)
                os.link(keep, path)
                saved += os.path.getsize(keep)
print(f"slim-venv: {saved >> 20} MB of duplicate shared libraries linked")
EOF
