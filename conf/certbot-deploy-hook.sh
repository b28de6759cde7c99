#!/bin/sh
# certbot deploy hook for twisted_rt: after a renewal, copy the new pair where
# the daemon reads it and ask it to reload (SIGHUP via the unit's ExecReload).
# Open WebSocket/SSE connections stay up; new ones get the new certificate.
# If the new files do not load, the daemon keeps the old certificate and logs
# "TLS reload failed for ...; keeping the old certificate".
#
# Install:
#   install -m 0755 conf/certbot-deploy-hook.sh /etc/letsencrypt/renewal-hooks/deploy/twisted-rt.sh
# with, in /etc/twisted-rt/twisted-rt.toml:
#   [server]
#   listen = ["ssl:443", "tcp:80"]
#   redirect_http_to_https = true
#   hsts_seconds = 31536000
#   [tls]
#   cert = "/etc/twisted-rt/tls/fullchain.pem"
#   key = "/etc/twisted-rt/tls/privkey.pem"
# (the daemon's user cannot read /etc/letsencrypt/live, hence the copy; the
# service needs CAP_NET_BIND_SERVICE, or socket activation, for ports < 1024).
set -eu

DEST=${TWISTED_RT_TLS_DIR:-/etc/twisted-rt/tls}
OWNER=${TWISTED_RT_USER:-twisted-rt}   # the unit's User=/Group=
UNIT=${TWISTED_RT_UNIT:-twisted-rt.service}

# certbot sets RENEWED_LINEAGE to /etc/letsencrypt/live/<name>
: "${RENEWED_LINEAGE:?run me as a certbot --deploy-hook}"

install -d -m 0750 -o root -g "$OWNER" "$DEST"
# write beside the old files, then rename: the daemon never reads a half-written file
install -m 0644 -o root -g "$OWNER" "$RENEWED_LINEAGE/fullchain.pem" "$DEST/.fullchain.pem.new"
install -m 0640 -o root -g "$OWNER" "$RENEWED_LINEAGE/privkey.pem" "$DEST/.privkey.pem.new"
mv -f "$DEST/.privkey.pem.new" "$DEST/privkey.pem"
mv -f "$DEST/.fullchain.pem.new" "$DEST/fullchain.pem"

systemctl reload "$UNIT"
