#!/usr/bin/env bash
# Make sure a RabbitMQ broker answers on AMQP_URL's host and port.
# Order: already up; a local rabbitmq-server; a container (docker or podman); else explain and fail.
# On a local broker it also enables the plugins the project needs: rabbitmq_consistent_hash_exchange (model
# routes: workers with --traffic-weight refuse to start without it) and rabbitmq_management (KEDA's default
# protocol, `producer route show`). A fresh `rabbitmq-server -detached` (CI) starts without them.
set -euo pipefail
url="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/}"
hostport="${url#*://}"; hostport="${hostport#*@}"; hostport="${hostport%%/*}"
host="${hostport%%:*}"; port="${hostport##*:}"; [[ "$port" == "$host" ]] && port=5672

answers() { (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; }
PLUGINS=(rabbitmq_consistent_hash_exchange rabbitmq_management)
enable_plugins() {
  # Only a broker on this machine can be changed from here; a remote one must have the plugins already.
  command -v rabbitmq-plugins >/dev/null || return 0
  if rabbitmq-plugins -q enable "${PLUGINS[@]}" >/dev/null 2>&1; then
    echo "broker: plugins enabled: ${PLUGINS[*]}"
  else
    echo "broker: could not enable ${PLUGINS[*]}; run: rabbitmq-plugins enable ${PLUGINS[*]}" >&2
    return 1
  fi
}
wait_up() {
  for _ in $(seq 1 60); do answers && return 0; sleep 1; done
  return 1
}

if answers; then
  echo "broker: answering on $host:$port"
  if [[ "$host" == "127.0.0.1" || "$host" == "localhost" ]]; then enable_plugins; fi
  exit 0
fi
if [[ "$host" != "127.0.0.1" && "$host" != "localhost" ]]; then
  echo "broker: nothing answers on $host:$port; start it or set AMQP_URL" >&2; exit 1
fi
if command -v rabbitmq-server >/dev/null; then
  echo "broker: starting the local rabbitmq-server"
  rabbitmq-plugins -q --offline enable "${PLUGINS[@]}" >/dev/null 2>&1 || true  # enabled at boot
  rabbitmq-server -detached
  if command -v rabbitmqctl >/dev/null; then rabbitmqctl -q await_startup >/dev/null 2>&1 || true; fi
  wait_up && { echo "broker: up on $host:$port"; enable_plugins; exit 0; }
fi
for engine in podman docker; do
  if command -v "$engine" >/dev/null && "$engine" info >/dev/null 2>&1; then
    echo "broker: starting rabbitmq:3-management in $engine"
    "$engine" run -d --rm --name qinfer-rabbitmq -p "$port:5672" -p 15672:15672 rabbitmq:3-management >/dev/null
    wait_up || continue
    "$engine" exec qinfer-rabbitmq rabbitmq-plugins -q enable "${PLUGINS[@]}" >/dev/null
    echo "broker: up on $host:$port, plugins enabled: ${PLUGINS[*]}"; exit 0
  fi
done
cat >&2 <<MSG
broker: no RabbitMQ answers on $host:$port and none could be started.
  Install one (Debian/Ubuntu: apt-get install rabbitmq-server), start a container
  (docker run -d -p 5672:5672 -p 15672:15672 rabbitmq:3-management), or point AMQP_URL at a broker.
MSG
exit 1
