{{/*
Chart name, truncated to 63 characters (the DNS label limit).
*/}}
{{- define "qinfer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name of every resource: the release name, plus the chart name unless the release
name already contains it; truncated to 63 characters.
*/}}
{{- define "qinfer.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "qinfer.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every resource.
*/}}
{{- define "qinfer.labels" -}}
helm.sh/chart: {{ include "qinfer.chart" . }}
{{ include "qinfer.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: worker
{{- end }}

{{/*
Labels that select the worker pods (immutable once installed: keep them few).
*/}}
{{- define "qinfer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "qinfer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Name of the ServiceAccount the workers run as.
*/}}
{{- define "qinfer.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "qinfer.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Name of the Secret holding the broker credentials: an existing one, or the chart's own.
*/}}
{{- define "qinfer.secretName" -}}
{{- default (include "qinfer.fullname" .) .Values.broker.existingSecret }}
{{- end }}

{{/*
The worker image reference: repository plus digest when set, else plus tag (default: appVersion).
*/}}
{{- define "qinfer.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Where the worker reads the broker URL (a file of the broker Secret) and the TLS files (the TLS Secret).
*/}}
{{- define "qinfer.brokerMountPath" -}}/etc/qinfer/broker{{- end }}
{{- define "qinfer.tlsMountPath" -}}/etc/qinfer/tls{{- end }}

{{/*
Where a pod that talks to the broker finds its URL and TLS files, as `NAME: "path"` lines: the worker's
ConfigMap holds them, and the helm test Pod sets them as its env, so both read the same Secret files.
*/}}
{{- define "qinfer.brokerFiles" -}}
AMQP_URL_FILE: {{ printf "%s/amqp-url" (include "qinfer.brokerMountPath" .) | quote }}
{{- with .Values.broker.tls }}
{{- if .enabled }}
AMQP_CA_FILE: {{ printf "%s/ca.crt" (include "qinfer.tlsMountPath" $) | quote }}
{{- if .secretKeys.cert }}
AMQP_CERT_FILE: {{ printf "%s/tls.crt" (include "qinfer.tlsMountPath" $) | quote }}
AMQP_KEY_FILE: {{ printf "%s/tls.key" (include "qinfer.tlsMountPath" $) | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The read-only mounts of the broker Secret (URL) and, with broker.tls.enabled, of the TLS Secret: the same in the
worker container and in the helm test container.
*/}}
{{- define "qinfer.brokerVolumeMounts" -}}
- name: broker
  mountPath: {{ include "qinfer.brokerMountPath" . }}
  readOnly: true
{{- if .Values.broker.tls.enabled }}
- name: broker-tls
  mountPath: {{ include "qinfer.tlsMountPath" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/*
The volumes behind qinfer.brokerVolumeMounts: only the keys a client needs, mode 0440.
*/}}
{{- define "qinfer.brokerVolumes" -}}
- name: broker
  secret:
    secretName: {{ include "qinfer.secretName" . }}
    optional: false  # said outright: the pod cannot start without it (and podman kube play needs it)
    defaultMode: 288  # 0440: read-only, owner and the pod's fsGroup
    items:
      - key: {{ .Values.broker.secretKeys.amqpUrl }}
        path: amqp-url
{{- with .Values.broker.tls }}
{{- if .enabled }}
- name: broker-tls
  secret:
    secretName: {{ .secretName }}
    optional: false
    defaultMode: 288  # 0440: read-only, owner and the pod's fsGroup
    items:
      - key: {{ .secretKeys.ca }}
        path: ca.crt
      {{- if .secretKeys.cert }}
      - key: {{ .secretKeys.cert }}
        path: tls.crt
      - key: {{ .secretKeys.key }}
        path: tls.key
      {{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Name of the helm test Pod and of its NetworkPolicy.
*/}}
{{- define "qinfer.testName" -}}
{{- printf "%s-test" (include "qinfer.fullname" . | trunc 58 | trimSuffix "-") }}
{{- end }}

{{/*
Labels of the helm test Pod: the release's, without app.kubernetes.io/name, so that no selector of the workers
(Deployment, Service, PodDisruptionBudget, NetworkPolicy) picks the test Pod up.
*/}}
{{- define "qinfer.testLabels" -}}
helm.sh/chart: {{ include "qinfer.chart" . }}
{{ include "qinfer.testSelectorLabels" . }}
app.kubernetes.io/part-of: {{ include "qinfer.name" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels that select the helm test Pod (its NetworkPolicy's podSelector).
*/}}
{{- define "qinfer.testSelectorLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: helm-test
{{- end }}

{{/*
The model name the release's replies carry: worker.modelName, else (as the worker derives it) the model folder's
name or the model file's name without .onnx.
*/}}
{{- define "qinfer.replyModelName" -}}
{{- .Values.worker.modelName | default (base .Values.model.path | trimSuffix ".onnx") }}
{{- end }}

{{/*
Name of the ConfigMap holding KEDA's non-secret TLS parameter (tls: enable).
*/}}
{{- define "qinfer.kedaConfigName" -}}
{{- printf "%s-keda" (include "qinfer.fullname" . | trunc 58 | trimSuffix "-") }}
{{- end }}

{{/*
The worker's settings as environment variables, one per worker setting (see worker/settings.py).
The URL itself is not here: it holds credentials, so the worker reads it from the broker Secret, mounted
read-only as a file (AMQP_URL_FILE); the TLS files come from the TLS Secret, mounted the same way.
*/}}
{{- define "qinfer.workerEnv" -}}
{{- $w := .Values.worker -}}
{{ include "qinfer.brokerFiles" . }}
WORKER_MODEL: {{ .Values.model.path | quote }}
WORKER_MODEL_NAME: {{ $w.modelName | quote }}
WORKER_MODEL_VERSION: {{ $w.modelVersion | quote }}
WORKER_QUEUE: {{ $w.queue | quote }}
WORKER_TRAFFIC_WEIGHT: {{ $w.trafficWeight | toString | quote }}
WORKER_QUEUE_TYPE: {{ $w.queueType | quote }}
WORKER_DELIVERY_LIMIT: {{ $w.deliveryLimit | int | quote }}
WORKER_MAX_BATCH: {{ $w.maxBatch | int | quote }}
WORKER_MAX_DELAY_MS: {{ $w.maxDelayMs | toString | quote }}
WORKER_PREFETCH: {{ $w.prefetch | int | quote }}
WORKER_DEVICE: {{ $w.device | quote }}
WORKER_DEVICE_ID: {{ $w.deviceId | int | quote }}
WORKER_INTRA_OP_THREADS: {{ $w.intraOpThreads | int | quote }}
WORKER_MAX_TEXT_LENGTH: {{ $w.maxTextLength | int | quote }}
WORKER_GROUP_BY_LENGTH: {{ $w.groupByLength | toString | quote }}
WORKER_SCHEDULE: {{ $w.schedule | quote }}
WORKER_DRAIN_TIMEOUT_S: {{ $w.drainTimeoutS | toString | quote }}
WORKER_CONNECT_TIMEOUT_S: {{ $w.connectTimeoutS | toString | quote }}
WORKER_REPLY_HOLD_S: {{ $w.replyHoldS | toString | quote }}
WORKER_MAX_MESSAGE_BYTES: {{ $w.maxMessageBytes | int | quote }}
WORKER_MAX_TEXT_BYTES: {{ $w.maxTextBytes | int | quote }}
WORKER_REPLY_TO_PATTERN: {{ $w.replyToPattern | quote }}
WORKER_STALL_S: {{ $w.stallS | toString | quote }}
WORKER_HTTP_PORT: {{ $w.httpPort | int | quote }}
WORKER_LOG_FORMAT: {{ $w.logFormat | quote }}
WORKER_LOG_LEVEL: {{ $w.logLevel | quote }}
WORKER_PROCESSES: {{ $w.processes | toString | quote }}
WORKER_RESTART_BACKOFF_MAX_S: {{ $w.restartBackoffMaxS | toString | quote }}
WORKER_MAX_DEATHS: {{ $w.maxDeaths | int | quote }}
WORKER_DEATH_WINDOW_S: {{ $w.deathWindowS | toString | quote }}
{{- end }}

{{/*
The queue the workers consume: worker.queue, or with worker.trafficWeight the version's queue
(model.NAME.vVERSION, as producer/wire/names.py version_queue derives it).
*/}}
{{- define "qinfer.requestQueue" -}}
{{- $w := .Values.worker -}}
{{- if eq (toString $w.trafficWeight) "" -}}
{{- $w.queue -}}
{{- else -}}
{{- printf "model.%s.v%s" $w.modelName (toString $w.modelVersion) -}}
{{- end -}}
{{- end }}

{{/*
Checks across values that a schema cannot express; each failure names the keys to change.
*/}}
{{- define "qinfer.validate" -}}
{{- $w := .Values.worker -}}
{{- $minGrace := addf $w.drainTimeoutS .Values.drainMarginSeconds -}}
{{- if lt (float64 .Values.terminationGracePeriodSeconds) (float64 $minGrace) }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be at least worker.drainTimeoutS (%v) + drainMarginSeconds (%v): otherwise Kubernetes kills a draining worker before it has handed its in-flight work back" .Values.terminationGracePeriodSeconds $w.drainTimeoutS .Values.drainMarginSeconds) }}
{{- end }}
{{- if ne (toString $w.trafficWeight) "" }}
{{- if not (regexMatch "^[A-Za-z0-9_-]{1,100}$" $w.modelName) }}
{{- fail (printf "worker.trafficWeight is set, so worker.modelName names the model's route: use 1-100 letters, digits, '_' or '-' (got %q)" $w.modelName) }}
{{- end }}
{{- if not (regexMatch "^[A-Za-z0-9_-]{1,100}$" (toString $w.modelVersion)) }}
{{- fail (printf "worker.trafficWeight is set, so worker.modelVersion names the version's queue: use 1-100 letters, digits, '_' or '-', no dots (got %q)" (toString $w.modelVersion)) }}
{{- end }}
{{- end }}
{{- if eq (int $w.httpPort) 0 }}
{{- fail "worker.httpPort is 0 (no HTTP server), but the chart's probes and metrics Service need /livez, /readyz and /metrics: choose a port" }}
{{- end }}
{{- if and (not .Values.gpu.enabled) (eq $w.device "cuda") }}
{{- fail "worker.device is cuda but gpu.enabled is false: the pod would get no GPU. Set worker.device to cpu (or auto), or enable gpu" }}
{{- end }}
{{- if and .Values.model.volume.enabled (not .Values.model.volume.existingClaim) (not .Values.model.volume.source) }}
{{- fail "model.volume.enabled needs model.volume.existingClaim or model.volume.source" }}
{{- end }}
{{- if and .Values.model.volume.enabled .Values.model.volume.existingClaim .Values.model.volume.source }}
{{- fail "set one of model.volume.existingClaim and model.volume.source, not both" }}
{{- end }}
{{- if and .Values.model.volume.enabled (not (hasPrefix (printf "%s/" (trimSuffix "/" .Values.model.volume.mountPath)) .Values.model.path)) }}
{{- fail (printf "model.path (%s) must lie under model.volume.mountPath (%s) when the model comes from a volume" .Values.model.path .Values.model.volume.mountPath) }}
{{- end }}
{{- with .Values.broker.tls }}
{{- if .enabled }}
{{- if not .secretName }}
{{- fail "broker.tls.enabled needs broker.tls.secretName: the Secret with the CA bundle (and, for mutual TLS, the client certificate and key)" }}
{{- end }}
{{- if and (not $.Values.broker.existingSecret) $.Values.broker.auth.amqpUrl (not (hasPrefix "amqps://" $.Values.broker.auth.amqpUrl)) }}
{{- fail "broker.tls.enabled but broker.auth.amqpUrl is not an amqps:// URL: the worker would not use TLS. Use amqps:// and the broker's TLS port (5671 by default)" }}
{{- end }}
{{- if and .secretKeys.cert (not .secretKeys.key) }}
{{- fail "broker.tls.secretKeys.cert is set but broker.tls.secretKeys.key is empty: a client certificate needs its key" }}
{{- end }}
{{- if and $.Values.autoscaling.enabled (not (regexMatch "^(https|amqps)://" $.Values.autoscaling.host)) }}
{{- fail (printf "broker.tls.enabled but autoscaling.host (%s) is not https:// or amqps://: KEDA would send its broker password in clear text. Use the management API over TLS (https://HOST:15671/) or amqps://HOST:5671/" $.Values.autoscaling.host) }}
{{- end }}
{{- end }}
{{- end }}
{{- with .Values.autoscaling }}
{{- if .enabled }}
{{- if lt (int .maxReplicas) (int .minReplicas) }}
{{- fail (printf "autoscaling.maxReplicas (%v) is below autoscaling.minReplicas (%v)" .maxReplicas .minReplicas) }}
{{- end }}
{{- if regexMatch "^[a-z]+://[^/]*@" .host }}
{{- fail "autoscaling.host must not carry credentials: KEDA reads the user name and password from the Secret (broker.secretKeys.kedaUsername / kedaPassword)" }}
{{- end }}
{{- if and (eq .protocol "http") (not (hasPrefix "http" .host)) }}
{{- fail (printf "autoscaling.protocol is http, so autoscaling.host must be the management API URL (http:// or https://), not %s" .host) }}
{{- end }}
{{- if and (eq .protocol "amqp") (not (hasPrefix "amqp" .host)) }}
{{- fail (printf "autoscaling.protocol is amqp, so autoscaling.host must be an amqp:// or amqps:// URL, not %s" .host) }}
{{- end }}
{{- /* A pod holds up to worker.prefetch unacknowledged messages per consumer process (at least one with auto). */}}
{{- $processes := ternary 1 $w.processes (eq (toString $w.processes) "auto") }}
{{- $window := mulf (float64 $w.prefetch) (float64 (max 1 $processes)) }}
{{- if and (eq .protocol "http") (le (float64 .targetQueueLength) $window) }}
{{- fail (printf "autoscaling.targetQueueLength (%v) must exceed worker.prefetch x worker.processes (%v x %v = %v): over the management API the unacknowledged messages a busy replica holds count too, so a target at or below what one pod holds would scale out replicas that have nothing to do" .targetQueueLength $w.prefetch $w.processes $window) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
OpenTelemetry's own variables for the worker's traces (see the README's Tracing section); none unless
tracing.enabled.
*/}}
{{- define "qinfer.tracingEnv" -}}
{{- with .Values.tracing }}
{{- if .enabled }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ .protocol | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ .serviceName | default (include "qinfer.fullname" $) | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ .sampler | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ .samplerRatio | toString | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ printf "k8s.namespace.name=%s%s" $.Release.Namespace (.resourceAttributes | default "" | printf ",%s" | trimSuffix ",") | quote }}
{{- end }}
{{- end }}
{{- end }}
