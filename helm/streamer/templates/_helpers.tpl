{{/*
Names, labels and the pieces every role's pod shares. A role's templates pass
a dict {"ctx": $, "role": "<auth|connection|progress|gateway>"}.
*/}}

{{- define "streamer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "streamer.fullname" -}}
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

{{/* The name of one role's objects; leaves room for StatefulSet pod suffixes. */}}
{{- define "streamer.roleName" -}}
{{- printf "%s-%s" (include "streamer.fullname" .ctx | trunc 50 | trimSuffix "-") .role }}
{{- end }}

{{- define "streamer.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "streamer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "streamer.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "streamer.labels" -}}
helm.sh/chart: {{ include "streamer.chart" . }}
{{ include "streamer.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: streamer
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "streamer.roleSelectorLabels" -}}
{{ include "streamer.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .role }}
{{- end }}

{{- define "streamer.roleLabels" -}}
{{ include "streamer.labels" .ctx }}
app.kubernetes.io/component: {{ .role }}
{{- end }}

{{- define "streamer.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "streamer.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "streamer.image" -}}
{{- $image := .Values.image }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default .Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/* True (non-empty) when gRPC runs over TLS: mode mtls, or trust.tls.enabled. */}}
{{- define "streamer.tls.enabled" -}}
{{- if or (eq .Values.trust.mode "mtls") .Values.trust.tls.enabled }}true{{- end }}
{{- end }}

{{/* http or https, for every gRPC URL. */}}
{{- define "streamer.grpcScheme" -}}
{{- ternary "https" "http" (eq (include "streamer.tls.enabled" .) "true") }}
{{- end }}

{{/* In-cluster URL of a gRPC role: {"ctx": $, "role": "connection"}. */}}
{{- define "streamer.grpcUrl" -}}
{{- $values := index .ctx.Values .role }}
{{- printf "%s://%s.%s.svc.%s:%d" (include "streamer.grpcScheme" .ctx) (include "streamer.roleName" .) .ctx.Release.Namespace .ctx.Values.clusterDomain (int $values.port) }}
{{- end }}

{{/* In-cluster URL of every replica of a gRPC role, for the roles' calls to
each other: {"ctx": $, "role": "auth"}. It names the role's headless Service
(clusterIP None), whose name resolves to the address of every pod (ready ones
only, but for connection's, which publishes starting pods for the edges); the
caller resolves it again every 5 s, keeps a channel to each address, spreads
its calls over them in turn and goes on to the next replica when one does not
answer. The ClusterIP Service's name would resolve to one virtual IP: each
caller would pin one HTTP/2 connection to one pod. The host is the name the
caller verifies the target's certificate against (templates/certificates.yaml). */}}
{{- define "streamer.replicasUrl" -}}
{{- $values := index .ctx.Values .role }}
{{- printf "%s://%s.%s.svc.%s:%d" (include "streamer.grpcScheme" .ctx) (include "streamer.headlessName" .) .ctx.Release.Namespace .ctx.Values.clusterDomain (int $values.port) }}
{{- end }}

{{/* True (non-empty) when the store is DynamoDB: connection and progress are
Deployments of several replicas then. */}}
{{- define "streamer.dynamodb" -}}
{{- if eq .Values.store.type "dynamodb" }}true{{- end }}
{{- end }}

{{/* A role's headless Service: {"ctx": $, "role": ...}. Kept within the
63 characters of a Service name. */}}
{{- define "streamer.headlessName" -}}
{{- printf "%s-headless" (include "streamer.roleName" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{/*
The replicas a role runs (without autoscaling): {"ctx": $, "role": ...}.
auth and gateway: replicaCount. connection and progress: 1 with the embedded
store (a file one process owns); with DynamoDB replicaCount, or 2 when unset.
*/}}
{{- define "streamer.replicas" -}}
{{- $v := index .ctx.Values .role }}
{{- if has .role (list "auth" "gateway") }}
{{- $v.replicaCount | int }}
{{- else if include "streamer.dynamodb" .ctx }}
{{- if kindIs "invalid" $v.replicaCount }}2{{ else }}{{ $v.replicaCount | int }}{{ end }}
{{- else }}1
{{- end }}
{{- end }}

{{/* The most replicas a role may run: autoscaling's maxReplicas, else its replicas. */}}
{{- define "streamer.maxReplicas" -}}
{{- $v := index .ctx.Values .role }}
{{- if $v.autoscaling.enabled }}
{{- $v.autoscaling.maxReplicas | int }}
{{- else }}
{{- include "streamer.replicas" . }}
{{- end }}
{{- end }}

{{/* ConnectionService's internal edge stream, which the gateways dial. With
the embedded store, the one replica behind the connection Service; with
DynamoDB, the headless Service, whose name resolves to every replica (the
gateway resolves it again every 5 s and attaches to each address). */}}
{{- define "streamer.connectionEdgeUrl" -}}
{{- $role := dict "ctx" . "role" "connection" }}
{{- $host := ternary (include "streamer.headlessName" $role) (include "streamer.roleName" $role) (eq (include "streamer.dynamodb" .) "true") }}
{{- printf "%s://%s.%s.svc.%s:%d" (include "streamer.grpcScheme" .) $host .Release.Namespace .Values.clusterDomain (int .Values.connection.edgePort) }}
{{- end }}

{{/* The Secret holding a role's TLS certificate: {"ctx": $, "role": ...}. */}}
{{- define "streamer.tls.secretName" -}}
{{- $tls := .ctx.Values.trust.tls }}
{{- if $tls.certManager.enabled }}
{{- printf "%s-tls" (include "streamer.roleName" .) }}
{{- else }}
{{- index $tls.existingSecrets .role }}
{{- end }}
{{- end }}

{{/* The URI names a role's certificate carries: the roles it calls others as. */}}
{{- define "streamer.tls.uris" -}}
{{- $roles := dict "auth" (list) "connection" (list "backend") "progress" (list "backend") "gateway" (list "edge") }}
{{- range index $roles .role }}
- {{ printf "urn:streamer:role:%s" . }}
{{- end }}
{{- end }}

{{/* Where every pod finds its certificate (TLS). */}}
{{- define "streamer.tls.dir" -}}/etc/streamer/tls{{- end }}

{{/* The Secret holding the shared service secret (trust.mode token). */}}
{{- define "streamer.trust.secretName" -}}
{{- default (printf "%s-service-secret" (include "streamer.fullname" .)) .Values.trust.existingSecret }}
{{- end }}

{{/* Where every pod finds the shared service secret (trust.mode token). */}}
{{- define "streamer.trust.dir" -}}/etc/streamer/trust{{- end }}
{{- define "streamer.trust.file" -}}{{ include "streamer.trust.dir" . }}/service-secret{{- end }}

{{/* True (non-empty) when auth verifies tokens with keys the operator gave. */}}
{{- define "streamer.auth.hasKeys" -}}
{{- if or .Values.auth.keys.existingSecret .Values.auth.keys.existingConfigMap }}true{{- end }}
{{- end }}

{{/* Refuses values the schema cannot express. */}}
{{- define "streamer.validate" -}}
{{- if and .Values.auth.keys.existingSecret .Values.auth.keys.existingConfigMap }}
{{- fail "auth.keys: set existingSecret or existingConfigMap, not both" }}
{{- end }}
{{- if and (not (include "streamer.auth.hasKeys" .)) (not .Values.auth.jwks) (gt (int .Values.auth.replicaCount) 1) }}
{{- fail "auth.replicaCount > 1 needs auth.keys.existingSecret, auth.keys.existingConfigMap or auth.jwks: without them every auth replica makes its own development key, and a token would be accepted by one replica and refused by the next" }}
{{- end }}
{{- if and (not (include "streamer.auth.hasKeys" .)) (not .Values.auth.jwks) .Values.auth.autoscaling.enabled (gt (int .Values.auth.autoscaling.maxReplicas) 1) }}
{{- fail "auth.autoscaling (maxReplicas > 1) needs auth.keys.existingSecret, auth.keys.existingConfigMap or auth.jwks: without them every auth replica makes its own development key" }}
{{- end }}
{{- range $name := list "connection" "progress" }}
{{- $v := index $.Values $name }}
{{- if not (include "streamer.dynamodb" $) }}
{{- if and (not (kindIs "invalid" $v.replicaCount)) (gt (int $v.replicaCount) 1) }}
{{- fail (printf "%s.replicaCount > 1 needs store.type dynamodb: the embedded store is a file that one process owns, so %s runs as exactly one replica" $name $name) }}
{{- end }}
{{- if $v.autoscaling.enabled }}
{{- fail (printf "%s.autoscaling needs store.type dynamodb: with the embedded store %s runs as exactly one replica" $name $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- range $name := list "auth" "connection" "progress" "gateway" }}
{{- $a := (index $.Values $name).autoscaling }}
{{- if $a.enabled }}
{{- if gt (int $a.minReplicas) (int $a.maxReplicas) }}
{{- fail (printf "%s.autoscaling.minReplicas must not exceed %s.autoscaling.maxReplicas" $name $name) }}
{{- end }}
{{- if and (kindIs "invalid" $a.targetCPUUtilizationPercentage) (kindIs "invalid" $a.targetMemoryUtilizationPercentage) }}
{{- fail (printf "%s.autoscaling needs targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage" $name) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (gt (int (include "streamer.maxReplicas" (dict "ctx" . "role" "progress"))) 1) (not .Values.progress.asyncActions) }}
{{- fail "several progress replicas (progress.replicaCount, 2 when unset with store.type dynamodb, or progress.autoscaling) need progress.asyncActions to list every async action: a ProgressService replica otherwise accepts only the actions of the processors connected to it, so a request would be refused or accepted depending on the replica it reached. List them, or set progress.replicaCount=1" }}
{{- end }}
{{- if and (ne .Values.trust.mode "token") .Values.trust.existingSecret }}
{{- fail "trust.existingSecret is used only with trust.mode token: no other mode mounts a shared secret" }}
{{- end }}
{{- if include "streamer.tls.enabled" . }}
{{- $tls := .Values.trust.tls }}
{{- if $tls.certManager.enabled }}
{{- if not $tls.certManager.issuerRef.name }}
{{- fail "trust.tls.certManager.enabled needs trust.tls.certManager.issuerRef.name (a CA issuer)" }}
{{- end }}
{{- else }}
{{- range $role := list "auth" "connection" "progress" "gateway" }}
{{- if not (index $tls.existingSecrets $role) }}
{{- fail (printf "TLS (trust.mode mtls or trust.tls.enabled) needs each role's certificate: set trust.tls.certManager.enabled with an issuer, or trust.tls.existingSecrets.%s" $role) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- $c := .Values.connection }}
{{- if or (eq (int $c.edgePort) (int $c.port)) (eq (int $c.edgePort) (int $c.metricsPort)) (eq (int $c.port) (int $c.metricsPort)) }}
{{- fail "connection.port, connection.edgePort and connection.metricsPort must be three different ports: they are three listeners of one pod" }}
{{- end }}
{{- if le (int .Values.gateway.limits.idleTimeoutSeconds) (int .Values.gateway.limits.pingIntervalSeconds) }}
{{- fail "gateway.limits.idleTimeoutSeconds must be longer than gateway.limits.pingIntervalSeconds: a client answering every ping would be closed as idle" }}
{{- end }}
{{- if le (int .Values.terminationGracePeriodSeconds) (add 10 (int .Values.gateway.preStopSleepSeconds) | int) }}
{{- fail "terminationGracePeriodSeconds must exceed gateway.preStopSleepSeconds plus the 10 s drain" }}
{{- end }}
{{- end }}

{{/*
The gRPC probes of a role: native gRPC health checks against
grpc.health.v1.Health. Liveness asks for the server ("") and readiness for the
role's own service, which turns NOT_SERVING the moment draining starts. The
startup probe covers opening the store (health starts NOT_SERVING).
"livenessPort", when given, moves the liveness probe to another listener of
the same process (ConnectionService's edge listener), so that both listeners
are probed. With TLS (whose handshake the kubelet's gRPC probes cannot make)
the probes are HTTP on the metrics port instead: /healthz, and /readyz, which
answers 200 only while every gRPC listener of the process reports SERVING.
{"ctx": $, "role": ..., "service": "streamer.v1.ConnectionService", "livenessPort": 50054}
*/}}
{{- define "streamer.grpcProbes" -}}
{{- $port := int (index .ctx.Values .role).port -}}
{{- $livenessPort := int (default $port .livenessPort) -}}
{{- if include "streamer.tls.enabled" .ctx }}
{{- $metrics := int (index .ctx.Values .role).metricsPort -}}
startupProbe:
  httpGet:
    path: /readyz
    port: {{ $metrics }}
  periodSeconds: 2
  failureThreshold: 60
livenessProbe:
  httpGet:
    path: /healthz
    port: {{ $metrics }}
  periodSeconds: 10
  timeoutSeconds: 2
  failureThreshold: 3
readinessProbe:
  httpGet:
    path: /readyz
    port: {{ $metrics }}
  periodSeconds: 5
  timeoutSeconds: 2
  failureThreshold: 2
{{- else }}
startupProbe:
  grpc:
    port: {{ $port }}
    service: {{ .service | quote }}
  periodSeconds: 2
  failureThreshold: 60
livenessProbe:
  grpc:
    port: {{ $livenessPort }}
    service: ""
  periodSeconds: 10
  timeoutSeconds: 2
  failureThreshold: 3
readinessProbe:
  grpc:
    port: {{ $port }}
    service: {{ .service | quote }}
  periodSeconds: 5
  timeoutSeconds: 2
  failureThreshold: 2
{{- end }}
{{- end }}

{{/* Environment every role shares. */}}
{{- define "streamer.commonEnv" -}}
- name: STREAMER_LOG_FORMAT
  value: {{ .ctx.Values.logFormat | quote }}
- name: STREAMER_LOG
  value: {{ .ctx.Values.logLevel | quote }}
{{- with .ctx.Values.traces.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ printf "streamer-%s" $.role | quote }}
- name: OTEL_TRACES_SAMPLER
  value: parentbased_traceidratio
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $.ctx.Values.traces.sampleRatio | toString | quote }}
{{- end }}
- name: STREAMER_METRICS_LISTEN
  value: {{ printf "0.0.0.0:%d" (int (index .ctx.Values .role).metricsPort) | quote }}
# Set explicitly in both modes: unset, a role listening on 0.0.0.0 with no
# secret refuses to start.
- name: STREAMER_TRUST
  value: {{ .ctx.Values.trust.mode | quote }}
{{- if eq .ctx.Values.trust.mode "token" }}
- name: STREAMER_SERVICE_SECRET_FILE
  value: {{ include "streamer.trust.file" .ctx | quote }}
{{- end }}
{{- if ne .role "gateway" }}
{{- $store := .ctx.Values.store }}
- name: STREAMER_STORE
  value: {{ $store.type | quote }}
{{- if eq $store.type "dynamodb" }}
- name: STREAMER_DYNAMODB_TABLE_PREFIX
  value: {{ $store.dynamodb.tablePrefix | quote }}
{{- with $store.dynamodb.region }}
- name: STREAMER_DYNAMODB_REGION
  value: {{ . | quote }}
{{- end }}
{{- with $store.dynamodb.endpointUrl }}
- name: STREAMER_DYNAMODB_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- if include "streamer.tls.enabled" .ctx }}
- name: STREAMER_TLS_CERT
  value: {{ printf "%s/tls.crt" (include "streamer.tls.dir" .ctx) | quote }}
- name: STREAMER_TLS_KEY
  value: {{ printf "%s/tls.key" (include "streamer.tls.dir" .ctx) | quote }}
- name: STREAMER_TLS_CA
  value: {{ printf "%s/ca.crt" (include "streamer.tls.dir" .ctx) | quote }}
{{- end }}
{{- end }}

{{/*
The pod template of a role. The role's own env, ports, probes, volume mounts
and volumes come in the dict: {"ctx": $, "role": ..., "args": [...],
"env": yaml, "ports": yaml, "probes": yaml, "mounts": yaml, "volumes": yaml,
"lifecycle": yaml}.
*/}}
{{- define "streamer.podTemplate" -}}
{{- $ctx := .ctx }}
{{- $values := index $ctx.Values .role -}}
metadata:
  labels:
    {{- include "streamer.roleLabels" . | nindent 4 }}
    {{- with $ctx.Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- with $values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- $annotations := merge (dict) $values.podAnnotations $ctx.Values.podAnnotations }}
  {{- with $annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "streamer.serviceAccountName" $ctx }}
  automountServiceAccountToken: {{ $ctx.Values.serviceAccount.automountServiceAccountToken }}
  {{- with $ctx.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $values.priorityClassName }}
  priorityClassName: {{ . | quote }}
  {{- end }}
  securityContext:
    {{- toYaml $ctx.Values.podSecurityContext | nindent 4 }}
  terminationGracePeriodSeconds: {{ $ctx.Values.terminationGracePeriodSeconds }}
  enableServiceLinks: false
  containers:
    - name: {{ .role }}
      image: {{ include "streamer.image" $ctx | quote }}
      imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
      args:
        {{- toYaml .args | nindent 8 }}
      env:
        {{- include "streamer.commonEnv" . | nindent 8 }}
        {{- .env | nindent 8 }}
        {{- with $values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        {{- .ports | nindent 8 }}
        - name: metrics
          containerPort: {{ $values.metricsPort }}
          protocol: TCP
      {{- .probes | nindent 6 }}
      {{- with .lifecycle }}
      lifecycle:
        {{- . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $ctx.Values.containerSecurityContext | nindent 8 }}
      resources:
        {{- toYaml $values.resources | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        {{- if eq $ctx.Values.trust.mode "token" }}
        - name: service-secret
          mountPath: {{ include "streamer.trust.dir" $ctx }}
          readOnly: true
        {{- end }}
        {{- if include "streamer.tls.enabled" $ctx }}
        - name: tls
          mountPath: {{ include "streamer.tls.dir" $ctx }}
          readOnly: true
        {{- end }}
        {{- with .mounts }}
        {{- . | nindent 8 }}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir:
        sizeLimit: 64Mi
    {{- if eq $ctx.Values.trust.mode "token" }}
    # Only the one key, as the file STREAMER_SERVICE_SECRET_FILE names.
    - name: service-secret
      secret:
        secretName: {{ include "streamer.trust.secretName" $ctx }}
        items:
          - key: {{ $ctx.Values.trust.secretKey | quote }}
            path: service-secret
        # 0440 (owner root, group fsGroup) when the pod has an fsGroup, else 0444.
        defaultMode: {{ if $ctx.Values.podSecurityContext.fsGroup }}288{{ else }}292{{ end }}
    {{- end }}
    {{- if include "streamer.tls.enabled" $ctx }}
    # The role's certificate, key and CA bundle, as the files STREAMER_TLS_* name.
    - name: tls
      secret:
        secretName: {{ include "streamer.tls.secretName" . }}
        items:
          - key: tls.crt
            path: tls.crt
          - key: tls.key
            path: tls.key
          - key: ca.crt
            path: ca.crt
        defaultMode: {{ if $ctx.Values.podSecurityContext.fsGroup }}288{{ else }}292{{ end }}
    {{- end }}
    {{- with .volumes }}
    {{- . | nindent 4 }}
    {{- end }}
  {{- with $values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* A role's PodDisruptionBudget, for the roles that scale. */}}
{{- define "streamer.pdb" -}}
{{- $values := index .ctx.Values .role }}
{{- if $values.podDisruptionBudget.enabled }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "streamer.roleName" . }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "streamer.roleLabels" . | nindent 4 }}
spec:
  maxUnavailable: {{ $values.podDisruptionBudget.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "streamer.roleSelectorLabels" . | nindent 6 }}
{{- end }}
{{- end }}

{{/* A role's HorizontalPodAutoscaler (its Deployment), when enabled. */}}
{{- define "streamer.hpa" -}}
{{- $a := (index .ctx.Values .role).autoscaling }}
{{- if $a.enabled }}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "streamer.roleName" . }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "streamer.roleLabels" . | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "streamer.roleName" . }}
  minReplicas: {{ $a.minReplicas }}
  maxReplicas: {{ $a.maxReplicas }}
  metrics:
    {{- with $a.targetCPUUtilizationPercentage }}
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ . }}
    {{- end }}
    {{- with $a.targetMemoryUtilizationPercentage }}
    - type: Resource
      resource:
        name: memory
        target:
          type: Utilization
          averageUtilization: {{ . }}
    {{- end }}
  {{- with $a.behavior }}
  behavior:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end }}

{{/* A role's data volume claim template (StatefulSet roles). */}}
{{- define "streamer.volumeClaimTemplate" -}}
{{- $p := (index .ctx.Values .role).persistence -}}
- metadata:
    name: data
    labels:
      {{- include "streamer.roleSelectorLabels" . | nindent 6 }}
    {{- with $p.annotations }}
    annotations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
  spec:
    accessModes:
      {{- toYaml $p.accessModes | nindent 6 }}
    {{- if $p.storageClass }}
    storageClassName: {{ if eq $p.storageClass "-" }}""{{ else }}{{ $p.storageClass | quote }}{{ end }}
    {{- end }}
    resources:
      requests:
        storage: {{ $p.size | quote }}
{{- end }}
