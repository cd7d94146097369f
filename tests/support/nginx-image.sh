#!/usr/bin/env bash
# Builds an nginx OCI image from Debian's own packages, without a registry:
# `apt-get download` nginx, nginx-common and the libraries nginx links, `dpkg -x`
# them into a rootfs, then do what nginx-common's postinst does (the
# sites-enabled/default link, the default page in /var/www/html, the www-data
# user), pack it with umoci and export it with skopeo.
#
#   tests/support/nginx-image.sh OUT_DIR
#
# Output (stdout prints its path):
#   OUT_DIR/nginx-docker.tar   docker-archive, tag localhost/vessel-nginx:latest;
#                              runs `nginx -g 'daemon off;'` with Debian's
#                              /etc/nginx/nginx.conf, serving "Welcome to nginx!" on :80
#   OUT_DIR/nginx-oci.tar      the same image as an oci-archive (`vessel run --image`)
# Idempotent: rebuilt only when a package's candidate version or this script
# changes. Needs apt's package lists (apt-get update) and the Debian mirror.
set -euo pipefail

OUT=${1:?usage: nginx-image.sh OUT_DIR}
REF=${VESSEL_NGINX_IMAGE:-localhost/vessel-nginx:latest}
# nginx's Depends (apt-cache depends nginx) minus iproute2 (for its init
# script) and debconf (nginx-common's postinst), plus libc6's libgcc-s1.
PACKAGES=(nginx nginx-common libc6 libgcc-s1 libcrypt1 libpcre2-8-0 libssl3 zlib1g)
say() { echo "nginx-image: $*" >&2; }

for tool in umoci skopeo apt-get apt-cache dpkg sha256sum; do
    command -v "$tool" >/dev/null || { say "$tool missing (scripts/install-deps.sh)"; exit 1; }
done

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec 9>"$OUT/.nginx.lock"
flock 9
versions=$(apt-cache policy "${PACKAGES[@]}" | awk '/^[^ ]/ { p = $1 } /Candidate:/ { print p, $2 }')
if grep -q "(none)" <<<"$versions" || [[ $(wc -l <<<"$versions") -ne ${#PACKAGES[@]} ]]; then
    say "no candidate for some of ${PACKAGES[*]} (run apt-get update):"; say "$versions"; exit 1
fi
key=$( { echo "$versions"; cat "${BASH_SOURCE[0]}"; echo "$REF"; } | sha256sum | cut -d' ' -f1)
if [[ -f $OUT/.nginx.stamp && $(cat "$OUT/.nginx.stamp") == "$key" && -f $OUT/nginx-docker.tar && -f $OUT/nginx-oci.tar ]]; then
    echo "$OUT/nginx-docker.tar"
    exit 0
fi

work=$(mktemp -d "$OUT/.nginx-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
# apt's download sandbox (user _apt) must be able to write here.
mkdir -p "$work/debs"
chmod 755 "$work"
chown _apt "$work/debs" 2>/dev/null || true
(cd "$work/debs" && apt-get download -q "${PACKAGES[@]}" >&2)

layout=$work/layout
umoci init --layout "$layout"
umoci new --image "$layout:latest"
umoci unpack --image "$layout:latest" "$work/bundle" >/dev/null 2>&1
root=$work/bundle/rootfs
for deb in "$work"/debs/*.deb; do
    dpkg -x "$deb" "$root"
done
# What nginx-common's postinst and base-files would have set up.
mkdir -p "$root"/{run,tmp,var/www/html,var/log/nginx,var/lib/nginx}
chmod 1777 "$root/tmp"
ln -sf /etc/nginx/sites-available/default "$root/etc/nginx/sites-enabled/default"
cp "$root/usr/share/nginx/html/index.html" "$root/var/www/html/index.nginx-debian.html"
printf 'root:x:0:0:root:/root:/bin/false\nwww-data:x:33:33:www-data:/var/www:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nwww-data:x:33:\nnogroup:x:65534:\n' >"$root/etc/group"
umoci repack --image "$layout:latest" "$work/bundle" >/dev/null
umoci config --image "$layout:latest" \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.entrypoint /usr/sbin/nginx --config.cmd=-g --config.cmd='daemon off;' \
    --config.exposedports 80/tcp --config.stopsignal SIGQUIT --config.workingdir /
umoci gc --layout "$layout"

rm -f "$OUT/nginx-docker.tar" "$OUT/nginx-oci.tar"
skopeo --insecure-policy copy --quiet "oci:$layout:latest" "docker-archive:$OUT/nginx-docker.tar:$REF"
skopeo --insecure-policy copy --quiet "oci:$layout:latest" "oci-archive:$OUT/nginx-oci.tar:$REF"
echo "$key" >"$OUT/.nginx.stamp"
say "built $REF ($(tr '\n' ' ' <<<"$versions"))"
echo "$OUT/nginx-docker.tar"
