{{/* Chart name, truncated to the 63 characters Kubernetes names allow. */}}
{{- define "llm-exporter.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: "<release>-<chart>", or the release name when it already contains the chart name. */}}
{{- define "llm-exporter.fullname" -}}
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

{{- define "llm-exporter.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "llm-exporter.labels" -}}
helm.sh/chart: {{ include "llm-exporter.chart" . }}
{{ include "llm-exporter.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels selecting this release's objects (and, in full mode, its pods). */}}
{{- define "llm-exporter.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-exporter.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of the pods that carry the sidecar: ours in full mode, the user's in sidecar-only mode. */}}
{{- define "llm-exporter.podSelectorLabels" -}}
{{- if eq .Values.mode "sidecar-only" }}
{{- if not .Values.sidecarOnly.podSelector }}
{{- fail "mode sidecar-only needs sidecarOnly.podSelector: the labels of your engine pods" }}
{{- end }}
{{- toYaml .Values.sidecarOnly.podSelector }}
{{- else }}
{{- include "llm-exporter.selectorLabels" . }}
{{- end }}
{{- end }}

{{/* The workload the autoscaler scales. */}}
{{- define "llm-exporter.workloadName" -}}
{{- if eq .Values.mode "sidecar-only" }}
{{- required "mode sidecar-only with autoscaling needs sidecarOnly.workload.name" .Values.sidecarOnly.workload.name }}
{{- else }}
{{- include "llm-exporter.fullname" . }}
{{- end }}
{{- end }}

{{- define "llm-exporter.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llm-exporter.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Metric names used by the autoscalers. They must exist in exporter/catalogue.py (tests check) and
be served by the prometheus-adapter rules in deploy/prometheus-adapter/values.yaml.
*/}}
{{- define "llm-exporter.autoscalingMetric" -}}
{{- if and (eq .Values.autoscaling.metric "capacity") (not .Values.sidecar.capacity.requestsPerSecond) }}
{{- fail "autoscaling.metric=capacity needs sidecar.capacity.requestsPerSecond: run llm-exporter calibrate and pass its values.yaml (-f DIR/values.yaml)" }}
{{- end }}
{{- $names := dict "saturation" "llm_exporter_saturation_ratio" "sidecarQueue" "llm_exporter_requests_queued" "engineQueue" "llm_exporter_engine_requests_waiting" "capacity" "llm_exporter_capacity_load_ratio" }}
{{- get $names .Values.autoscaling.metric }}
{{- end }}

{{/* A PromQL matcher for this release's pods (the pod label Prometheus Operator adds). */}}
{{- define "llm-exporter.podMatcher" -}}
{{- if eq .Values.mode "sidecar-only" -}}
namespace="{{ .Release.Namespace }}",pod=~"{{ include "llm-exporter.workloadName" . }}-.*"
{{- else -}}
namespace="{{ .Release.Namespace }}",pod=~"{{ include "llm-exporter.fullname" . }}-.*"
{{- end }}
{{- end }}

{{/* A number as a Kubernetes quantity (0.8 -> "800m"). */}}
{{- define "llm-exporter.quantity" -}}
{{- $v := float64 . }}
{{- if eq $v (floor $v) }}
{{- printf "%d" (int64 $v) }}
{{- else }}
{{- printf "%dm" (round (mulf $v 1000) 0 | int64) }}
{{- end }}
{{- end }}

{{/* The engine's image: the flavor's official one unless set. */}}
{{- define "llm-exporter.engineImage" -}}
{{- $e := .Values.engine }}
{{- $gpu := gt (int $e.gpu.count) 0 }}
{{- $repos := dict "vllm" "vllm/vllm-openai" "sglang" "lmsysorg/sglang" "tgi" "ghcr.io/huggingface/text-generation-inference" "llamacpp" "ghcr.io/ggml-org/llama.cpp" }}
{{- $tags := dict "vllm" "v0.11.0" "sglang" "latest" "tgi" "latest" "llamacpp" (ternary "server-cuda" "server" $gpu) }}
{{- $repo := $e.image.repository | default (get $repos $e.flavor) }}
{{- if not $repo }}
{{- fail "engine.flavor custom needs engine.image.repository" }}
{{- end }}
{{- printf "%s:%s" $repo ($e.image.tag | default (get $tags $e.flavor) | default "latest") }}
{{- end }}

{{- define "llm-exporter.sidecarImage" -}}
{{- printf "%s:%s" .Values.sidecar.image.repository (.Values.sidecar.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The engine's command (a YAML list, possibly empty: the image's entrypoint). */}}
{{- define "llm-exporter.engineCommand" -}}
{{- $e := .Values.engine }}
{{- if $e.command }}
{{- toYaml $e.command }}
{{- else if eq $e.flavor "vllm" }}
- vllm
- serve
{{- else if eq $e.flavor "sglang" }}
- python3
- -m
- sglang.launch_server
{{- else if eq $e.flavor "llamacpp" }}
- /app/llama-server
{{- end }}
{{- end }}

{{/* The engine's arguments: the flavor's preset (or engine.args) followed by engine.extraArgs. */}}
{{- define "llm-exporter.engineArgs" -}}
{{- $e := .Values.engine }}
{{- $port := toString $e.port }}
{{- $gpus := int $e.gpu.count }}
{{- $args := list }}
{{- if $e.args }}
{{- $args = $e.args }}
{{- else if eq $e.flavor "vllm" }}
{{- $args = list $e.model "--host" "0.0.0.0" "--port" $port }}
{{- with $e.servedModelName }}
{{- $args = concat $args (list "--served-model-name" .) }}
{{- end }}
{{- if gt $gpus 1 }}
{{- $args = concat $args (list "--tensor-parallel-size" (toString $gpus)) }}
{{- end }}
{{- if and $e.otlpTraces (gt (int .Values.sidecar.otlpReceiverPort) 0) }}
{{- $args = concat $args (list "--otlp-traces-endpoint" (printf "http://127.0.0.1:%d/v1/traces" (int .Values.sidecar.otlpReceiverPort))) }}
{{- end }}
{{- else if eq $e.flavor "sglang" }}
{{- $args = list "--model-path" $e.model "--host" "0.0.0.0" "--port" $port "--enable-metrics" }}
{{- with $e.servedModelName }}
{{- $args = concat $args (list "--served-model-name" .) }}
{{- end }}
{{- if gt $gpus 1 }}
{{- $args = concat $args (list "--tp-size" (toString $gpus)) }}
{{- end }}
{{- else if eq $e.flavor "tgi" }}
{{- $args = list "--model-id" $e.model "--hostname" "0.0.0.0" "--port" $port }}
{{- if gt $gpus 1 }}
{{- $args = concat $args (list "--num-shard" (toString $gpus)) }}
{{- end }}
{{- else if eq $e.flavor "llamacpp" }}
{{- $args = list "--host" "0.0.0.0" "--port" $port "--metrics" }}
{{- if hasPrefix "/" $e.model }}
{{- $args = concat $args (list "--model" $e.model) }}
{{- else }}
{{- $args = concat $args (list "--hf-repo" $e.model) }}
{{- end }}
{{- if gt $gpus 0 }}
{{- $args = concat $args (list "--n-gpu-layers" "999") }}
{{- end }}
{{- end }}
{{- $args = concat $args $e.extraArgs }}
{{- if $args }}
{{- toYaml $args }}
{{- end }}
{{- end }}

{{/* The engine container. */}}
{{- define "llm-exporter.engineContainer" -}}
{{- $e := .Values.engine }}
name: engine
image: {{ include "llm-exporter.engineImage" . }}
imagePullPolicy: {{ $e.image.pullPolicy }}
{{- with (include "llm-exporter.engineCommand" . | trim) }}
command:
{{- . | nindent 2 }}
{{- end }}
{{- with (include "llm-exporter.engineArgs" . | trim) }}
args:
{{- . | nindent 2 }}
{{- end }}
ports:
  - name: engine
    containerPort: {{ $e.port }}
    protocol: TCP
env:
  # Non-root with no passwd entry: PyTorch's cache paths need a user name.
  - name: USER
    value: engine
  {{- if $e.modelCache.enabled }}
  - name: HOME
    value: {{ $e.modelCache.mountPath | quote }}
  - name: HF_HOME
    value: {{ printf "%s/huggingface" $e.modelCache.mountPath | quote }}
  {{- else }}
  - name: HOME
    value: /tmp
  {{- end }}
  {{- if eq $e.flavor "vllm" }}
  - name: VLLM_NO_USAGE_STATS
    value: "1"
  - name: DO_NOT_TRACK
    value: "1"
  {{- if and $e.otlpTraces (gt (int .Values.sidecar.otlpReceiverPort) 0) }}
  - name: OTEL_EXPORTER_OTLP_TRACES_PROTOCOL
    value: http/protobuf
  - name: OTEL_SERVICE_NAME
    value: {{ printf "%s-engine" (include "llm-exporter.fullname" .) | quote }}
  {{- end }}
  {{- end }}
  {{- with $e.env }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with $e.envFrom }}
envFrom:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $e.startupProbe }}
startupProbe:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $e.readinessProbe }}
readinessProbe:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $e.livenessProbe }}
livenessProbe:
  {{- toYaml . | nindent 2 }}
{{- end }}
resources:
  {{- $res := deepCopy ($e.resources | default dict) }}
  {{- if gt (int $e.gpu.count) 0 }}
  {{- $limits := $res.limits | default dict }}
  {{- $_ := set $limits $e.gpu.resourceName (int $e.gpu.count) }}
  {{- $_ := set $res "limits" $limits }}
  {{- end }}
  {{- toYaml $res | nindent 2 }}
{{- with $e.securityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumeMounts:
  - name: tmp
    mountPath: /tmp
  {{- if $e.shmSize }}
  - name: shm
    mountPath: /dev/shm
  {{- end }}
  {{- if $e.modelCache.enabled }}
  - name: model-cache
    mountPath: {{ $e.modelCache.mountPath }}
  {{- end }}
  {{- with $e.extraVolumeMounts }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/* The sidecar's upstream: the engine on localhost. */}}
{{- define "llm-exporter.upstream" -}}
{{- if .Values.sidecar.upstream }}
{{- .Values.sidecar.upstream }}
{{- else if eq .Values.mode "sidecar-only" }}
{{- printf "http://127.0.0.1:%d" (int .Values.sidecarOnly.enginePort) }}
{{- else }}
{{- printf "http://127.0.0.1:%d" (int .Values.engine.port) }}
{{- end }}
{{- end }}

{{/*
The sidecar container: the same spec in full mode (in the Deployment) and in sidecar-only mode
(in the ConfigMap users merge into their own pod template).
*/}}
{{- define "llm-exporter.sidecarContainer" -}}
{{- $s := .Values.sidecar }}
name: llm-exporter
image: {{ include "llm-exporter.sidecarImage" . }}
imagePullPolicy: {{ $s.image.pullPolicy }}
args:
  - serve
  {{- with $s.extraArgs }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
ports:
  # Prefixed names: in sidecar-only mode they must not collide with your engine's port names.
  - name: llm-proxy
    containerPort: {{ $s.port }}
    protocol: TCP
  - name: llm-metrics
    containerPort: {{ $s.metricsPort }}
    protocol: TCP
  {{- if gt (int $s.otlpReceiverPort) 0 }}
  - name: llm-otlp
    containerPort: {{ $s.otlpReceiverPort }}
    protocol: TCP
  {{- end }}
env:
  - name: LLM_EXPORTER_UPSTREAM
    value: {{ include "llm-exporter.upstream" . | quote }}
  - name: LLM_EXPORTER_PORT
    value: {{ $s.port | quote }}
  - name: LLM_EXPORTER_METRICS_PORT
    value: {{ $s.metricsPort | quote }}
  - name: LLM_EXPORTER_OTLP_RECEIVER_PORT
    value: {{ $s.otlpReceiverPort | quote }}
  {{- with $s.engineMetricsUrl }}
  - name: LLM_EXPORTER_ENGINE_METRICS_URL
    value: {{ . | quote }}
  {{- end }}
  - name: LLM_EXPORTER_MAX_CONCURRENCY
    value: {{ $s.maxConcurrency | quote }}
  - name: LLM_EXPORTER_MAX_QUEUE
    value: {{ $s.maxQueue | quote }}
  - name: LLM_EXPORTER_UPSTREAM_TIMEOUT
    value: {{ $s.upstreamTimeout | quote }}
  - name: LLM_EXPORTER_MAX_MODELS
    value: {{ $s.maxModels | quote }}
  {{- if include "llm-exporter.sloConfigMap" . }}
  - name: LLM_EXPORTER_SLO
    value: /etc/llm-exporter/slo.yaml
  {{- end }}
  - name: LLM_EXPORTER_SATURATION_QUEUE_THRESHOLD
    value: {{ $s.saturation.queueThreshold | quote }}
  - name: LLM_EXPORTER_SATURATION_KV_THRESHOLD
    value: {{ $s.saturation.kvThreshold | quote }}
  {{- if $s.capacity.requestsPerSecond }}
  - name: LLM_EXPORTER_CAPACITY_RPS
    value: {{ $s.capacity.requestsPerSecond | quote }}
  {{- end }}
  - name: LLM_EXPORTER_GPU_HOURLY_COST
    value: {{ $s.gpuHourlyCost | quote }}
  - name: LLM_EXPORTER_REPLICA_HOURLY_COST
    value: {{ $s.replicaHourlyCost | quote }}
  - name: LLM_EXPORTER_GPU
    value: {{ ternary "true" "false" $s.gpu | quote }}
  - name: LLM_EXPORTER_LOG_LEVEL
    value: {{ $s.logLevel | quote }}
  {{- with $s.nvidiaVisibleDevices }}
  - name: NVIDIA_VISIBLE_DEVICES
    value: {{ . | quote }}
  {{- end }}
  - name: OTEL_SERVICE_NAME
    value: {{ include "llm-exporter.fullname" . | quote }}
  - name: OTEL_RESOURCE_ATTRIBUTES
    value: {{ printf "k8s.namespace.name=%s" .Release.Namespace | quote }}
  {{- if $s.tracing.endpoint }}
  - name: OTEL_EXPORTER_OTLP_ENDPOINT
    value: {{ $s.tracing.endpoint | quote }}
  - name: OTEL_EXPORTER_OTLP_PROTOCOL
    value: {{ $s.tracing.protocol | quote }}
  - name: OTEL_TRACES_SAMPLER
    value: parentbased_traceidratio
  - name: OTEL_TRACES_SAMPLER_ARG
    value: {{ $s.tracing.sampleRatio | quote }}
  {{- else }}
  - name: OTEL_TRACES_EXPORTER
    value: none
  {{- end }}
  {{- with $s.env }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with $s.readinessProbe }}
readinessProbe:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $s.livenessProbe }}
livenessProbe:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $s.resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $s.securityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumeMounts:
  - name: llm-exporter-tmp
    mountPath: /tmp
  {{- if include "llm-exporter.sloConfigMap" . }}
  - name: llm-exporter-slo
    mountPath: /etc/llm-exporter
    readOnly: true
  {{- end }}
{{- end }}

{{/* The ConfigMap holding the sidecar's SLO file, or "" when none is mounted. */}}
{{- define "llm-exporter.sloConfigMap" -}}
{{- $slo := .Values.sidecar.slo }}
{{- if $slo.enabled }}
{{- if $slo.existingConfigMap }}
{{- $slo.existingConfigMap }}
{{- else if .Files.Get "files/slo.yaml" }}
{{- printf "%s-slo" (include "llm-exporter.fullname" .) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The sidecar's volumes. */}}
{{- define "llm-exporter.sidecarVolumes" -}}
- name: llm-exporter-tmp
  emptyDir:
    sizeLimit: 64Mi
{{- with include "llm-exporter.sloConfigMap" . }}
- name: llm-exporter-slo
  configMap:
    name: {{ . }}
{{- end }}
{{- end }}

{{/* A map as "k=v, k=v" for messages. */}}
{{- define "llm-exporter.inlineLabels" -}}
{{- $out := list }}
{{- range $k, $v := . }}
{{- $out = append $out (printf "%s=%v" $k $v) }}
{{- end }}
{{- join ", " $out }}
{{- end }}

{{/* Checks the schema cannot express; included once, from service.yaml. */}}
{{- define "llm-exporter.validate" -}}
{{- $a := .Values.autoscaling }}
{{- if and $a.enabled (lt (int $a.maxReplicas) (int $a.minReplicas)) }}
{{- fail (printf "autoscaling.maxReplicas (%v) must be at least autoscaling.minReplicas (%v)" $a.maxReplicas $a.minReplicas) }}
{{- end }}
{{- $s := .Values.sidecar }}
{{- $enginePort := ternary .Values.sidecarOnly.enginePort .Values.engine.port (eq .Values.mode "sidecar-only") }}
{{- $ports := dict }}
{{- $named := list (list "sidecar.port" $s.port) (list "sidecar.metricsPort" $s.metricsPort) (list "sidecar.otlpReceiverPort" $s.otlpReceiverPort) (list "the engine port" $enginePort) }}
{{- range $named }}
{{- $key := toString (int (index . 1)) }}
{{- if and (ne $key "0") (hasKey $ports $key) }}
{{- fail (printf "%s and %s are both %s: the sidecar and the engine share the pod's network, so their ports must differ" (get $ports $key) (index . 0) $key) }}
{{- end }}
{{- $_ := set $ports $key (index . 0) }}
{{- end }}
{{- end }}
