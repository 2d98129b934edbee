#!/usr/bin/env bash
# Debian packages that the integration tests drive for real (called by `make test`):
#   chromium         - renders report.html headless (tests/integration/test_report_browser.py)
#   orthanc          - the PACS of the DICOMweb and DIMSE round trips (tests/integration/test_pacs*.py)
#   orthanc-dicomweb - Orthanc's DICOMweb plugin (QIDO-RS, WADO-RS, STOW-RS)
#   dcmtk            - storescu / echoscu as the sending modality
#   dicom3tools      - dciodvfy, the DICOM object validator
# Installed with apt-get (update once, then install -y) when missing. Without root the script
# only warns; the tests that need a missing tool are then skipped, except under CI=true, where
# they fail.
set -euo pipefail
packages=()
command -v chromium >/dev/null 2>&1 || packages+=(chromium)
command -v Orthanc >/dev/null 2>&1 || packages+=(orthanc)
ls /usr/share/orthanc/plugins*/libOrthancDicomWeb.so >/dev/null 2>&1 || packages+=(orthanc-dicomweb)
command -v storescu >/dev/null 2>&1 || packages+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || packages+=(dicom3tools)
if [ ${#packages[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_system_deps: not root, cannot apt-get install ${packages[*]}; tests needing them will be skipped" >&2
    exit 0
fi
echo "install_system_deps: apt-get install ${packages[*]}" >&2
apt-get update -qq
# policy-rc.d 101: the packages' own services are not started (the tests start Orthanc themselves)
DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
