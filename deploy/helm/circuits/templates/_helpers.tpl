{{/*
Shared helpers for every component. Component helpers take a dict:
  root      the top-level context ($)
  name      the component key (attribution, aggregator, labeler, atlas, vllm)
  values    the component's block (.Values.<name>)
*/}}

{{- define "circuits.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "circuits.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "circuits.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <fullname>-<component>, at most 63 characters. */}}
{{- define "circuits.componentName" -}}
{{- printf "%s-%s" (include "circuits.fullname" .root) .name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "circuits.selectorLabels" -}}
app.kubernetes.io/name: {{ include "circuits.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{- define "circuits_core.labels" -}}
helm.sh/chart: {{ include "circuits.chart" .root }}
{{ include "circuits.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: circuits
{{- end -}}

{{/* Selector matching every pod of this release (any component). */}}
{{- define "circuits.releasePodSelector" -}}
app.kubernetes.io/name: {{ include "circuits.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "circuits.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "circuits.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* registry/repository:tag; tag "" = the chart's appVersion. */}}
{{- define "circuits.image" -}}
{{- $registry := .root.Values.global.imageRegistry -}}
{{- $repository := .values.image.repository -}}
{{- $tag := default .root.Chart.AppVersion .values.image.tag -}}
{{- if $registry -}}
{{- printf "%s/%s:%s" (trimSuffix "/" $registry) $repository $tag -}}
{{- else -}}
{{- printf "%s:%s" $repository $tag -}}
{{- end -}}
{{- end -}}

{{/* Pod metadata (labels + annotations) for a component's pod template; optional extraAnnotations. */}}
{{- define "circuits.podMetadata" -}}
labels:
  {{- include "circuits_core.labels" . | nindent 2 }}
  {{- with .values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- $annotations := merge (deepCopy (default dict .extraAnnotations)) (deepCopy (default dict .values.podAnnotations)) }}
{{- with $annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
Pod-level fields every component shares: service account, pull secrets, pod security context
(global defaults under the component's own), scheduling.
*/}}
{{- define "circuits.podCommon" -}}
serviceAccountName: {{ include "circuits.serviceAccountName" .root }}
automountServiceAccountToken: {{ .root.Values.serviceAccount.automountServiceAccountToken }}
{{- with .root.Values.global.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
securityContext:
  {{- mergeOverwrite (deepCopy .root.Values.global.podSecurityContext) (deepCopy .values.podSecurityContext) | toYaml | nindent 2 }}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Container securityContext: global defaults under the component's own keys. */}}
{{- define "circuits.securityContext" -}}
{{- mergeOverwrite (deepCopy .root.Values.global.securityContext) (deepCopy .values.securityContext) | toYaml -}}
{{- end -}}

{{/*
Container resources with the GPU request added: extended resources need requests == limits.
Takes dict root, resources, gpu ({count, resourceName} or nil).
*/}}
{{- define "circuits.resources" -}}
{{- $resources := deepCopy (default dict .resources) -}}
{{- if and .gpu (gt (int .gpu.count) 0) -}}
{{- $requests := default dict (get $resources "requests") -}}
{{- $limits := default dict (get $resources "limits") -}}
{{- $_ := set $requests .gpu.resourceName (int .gpu.count) -}}
{{- $_ := set $limits .gpu.resourceName (int .gpu.count) -}}
{{- $_ := set $resources "requests" $requests -}}
{{- $_ := set $resources "limits" $limits -}}
{{- end -}}
{{- toYaml $resources -}}
{{- end -}}

{{/*
startup/liveness/readiness probes. Takes dict values (the component) and handler: the probe
action as a dict, e.g. (dict "grpc" (dict "port" 50051)) or (dict "httpGet" ...); optional
readinessHandler when readiness asks something else than liveness.
*/}}
{{- define "circuits.probes" -}}
{{- range $kind := list "startup" "liveness" "readiness" }}
{{- $probe := get $.values.probes $kind }}
{{- $handler := $.handler }}
{{- if and (eq $kind "readiness") $.readinessHandler }}{{ $handler = $.readinessHandler }}{{ end }}
{{- if $probe.enabled }}
{{ $kind }}Probe:
  {{- toYaml $handler | nindent 2 }}
  initialDelaySeconds: {{ $probe.initialDelaySeconds }}
  periodSeconds: {{ $probe.periodSeconds }}
  timeoutSeconds: {{ $probe.timeoutSeconds }}
  failureThreshold: {{ $probe.failureThreshold }}
  {{- if ne $kind "readiness" }}
  successThreshold: 1
  {{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Native gRPC probes on the standard grpc.health.v1 service ("" = the whole server). */}}
{{- define "circuits.grpcProbes" -}}
{{- include "circuits.probes" (dict "values" .values "handler" (dict "grpc" (dict "port" (int .values.service.port) "service" ""))) -}}
{{- end -}}

{{/* gRPC (and metrics, when set) container ports. */}}
{{- define "circuits.containerPorts" -}}
- name: grpc
  containerPort: {{ .values.service.port }}
  protocol: TCP
{{- if .values.service.metricsPort }}
- name: metrics
  containerPort: {{ .values.service.metricsPort }}
  protocol: TCP
{{- end }}
{{- end -}}

{{/*
Arguments every circuits server takes, then the component's extraArgs:
--host 0.0.0.0 --port P [--metrics-port Q]. Rendered as a YAML list (no leading newline).
*/}}
{{- define "circuits.serverArgs" -}}
{{- $args := list "--host" "0.0.0.0" "--port" (toString .values.service.port) -}}
{{- $g := .root.Values.global -}}
{{- if $g.tls.secretName -}}
{{- $args = concat $args (list "--tls-cert" "/etc/circuits/tls/tls.crt" "--tls-key" "/etc/circuits/tls/tls.key") -}}
{{- if $g.tls.mutual -}}
{{- $args = concat $args (list "--tls-client-ca" "/etc/circuits/tls/ca.crt") -}}
{{- end -}}
{{- else -}}
{{- $args = append $args "--insecure" -}}
{{- end -}}
{{- if $g.auth.tokensSecret -}}
{{- $args = concat $args (list "--auth-tokens-file" "/etc/circuits/auth/tokens") -}}
{{- end -}}
{{- if .values.service.metricsPort -}}
{{- $args = concat $args (list "--metrics-port" (toString .values.service.metricsPort)) -}}
{{- end -}}
{{- range .values.extraArgs -}}
{{- $args = append $args (toString .) -}}
{{- end -}}
{{- toYaml $args -}}
{{- end -}}

{{/* The writable /tmp every container gets (root filesystems are read-only). */}}
{{- define "circuits.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .root.Values.global.tmpSizeLimit }}
{{- with .root.Values.global.tls.secretName }}
- name: tls
  secret:
    secretName: {{ . }}
    # Owner and the pod's fsGroup only: the server warns about key/token files others can read.
    defaultMode: 0440
{{- end }}
{{- with .root.Values.global.auth.tokensSecret }}
- name: auth-tokens
  secret:
    secretName: {{ . }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{- define "circuits.tmpVolumeMount" -}}
- name: tmp
  mountPath: /tmp
{{- if .root.Values.global.tls.secretName }}
- name: tls
  mountPath: /etc/circuits/tls
  readOnly: true
{{- end }}
{{- if .root.Values.global.auth.tokensSecret }}
- name: auth-tokens
  mountPath: /etc/circuits/auth
  readOnly: true
{{- end }}
{{- end -}}

{{/*
Model cache volume "model-cache" from a {type,size,sizeLimit,existingClaim} block.
Takes dict root, name, values (the component; reads values.modelCache).
*/}}
{{- define "circuits.modelCacheVolume" -}}
{{- $cache := .values.modelCache -}}
- name: model-cache
{{- if eq $cache.type "emptyDir" }}
  emptyDir:
    sizeLimit: {{ $cache.sizeLimit }}
{{- else if eq $cache.type "existingClaim" }}
  persistentVolumeClaim:
    claimName: {{ required (printf "%s.modelCache.existingClaim is required when type is existingClaim" .name) $cache.existingClaim }}
{{- else }}
  persistentVolumeClaim:
    claimName: {{ include "circuits.componentName" . }}-model-cache
{{- end }}
{{- end -}}

{{/* Environment pointing every cache at the model-cache volume. */}}
{{- define "circuits.cacheEnv" -}}
- name: HF_HOME
  value: {{ printf "%s/huggingface" .values.modelCache.mountPath | quote }}
- name: CIRCUITS_HOME
  value: {{ printf "%s/circuits" .values.modelCache.mountPath | quote }}
{{- end -}}

{{/* An env var read from an existing Secret: dict env, secret ({secretName, secretKey}). */}}
{{- define "circuits.secretEnv" -}}
{{- if .secret.secretName }}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ .secret.secretName }}
      key: {{ .secret.secretKey }}
{{- end }}
{{- end -}}

{{/* Environment every circuits container gets (writable HOME, unbuffered logs). */}}
{{- define "circuits.baseEnv" -}}
- name: HOME
  value: /tmp
- name: PYTHONUNBUFFERED
  value: "1"
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- end -}}

{{/*
initContainer downloading a file once (skipped when already present), checked against a sha256
when given. Uses the component's own image (Python is there) and the chart's fetch script.
Takes dict root, values, containerName, url, sha256, dest, volumeName, mountPath.
*/}}
{{- define "circuits.fetchInitContainer" -}}
- name: {{ .containerName }}
  image: {{ include "circuits.image" . }}
  imagePullPolicy: {{ .values.image.pullPolicy }}
  command: ["python", "/opt/circuits-fetch/fetch.py"]
  args:
    - --url
    - {{ .url | quote }}
    - --dest
    - {{ .dest | quote }}
    {{- if .sha256 }}
    - --sha256
    - {{ .sha256 | quote }}
    {{- end }}
  securityContext:
    {{- include "circuits.securityContext" . | nindent 4 }}
  resources:
    requests:
      cpu: 100m
      memory: 128Mi
    limits:
      memory: 512Mi
  volumeMounts:
    - name: {{ .volumeName }}
      mountPath: {{ .mountPath }}
    - name: fetch-script
      mountPath: /opt/circuits-fetch
      readOnly: true
    {{- include "circuits.tmpVolumeMount" . | nindent 4 }}
{{- end -}}

{{- define "circuits.fetchScriptVolume" -}}
- name: fetch-script
  configMap:
    name: {{ include "circuits.fullname" .root }}-fetch
{{- end -}}

{{/* Comma-separated host:port of every aggregator shard (per-pod DNS names of the headless Service). */}}
{{- define "circuits.aggregatorAddresses" -}}
{{- $name := include "circuits.componentName" (dict "root" . "name" "aggregator") -}}
{{- $addresses := list -}}
{{- range $i := until (int .Values.aggregator.replicaCount) -}}
{{- $addresses = append $addresses (printf "%s-%d.%s-headless.%s.svc:%d" $name $i $name $.Release.Namespace (int $.Values.aggregator.service.port)) -}}
{{- end -}}
{{- join "," $addresses -}}
{{- end -}}

{{/*
A component's Service: grpc (+ metrics) ports. Takes dict root, name, values, and optional
headless (true for the aggregator's per-shard names), readyOnly (a headless Service listing only
ready pods), portName (default grpc).
*/}}
{{- define "circuits.service" -}}
{{- $svcName := include "circuits.componentName" . -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ if .headless }}{{ $svcName }}-headless{{ else }}{{ $svcName }}{{ end }}
  labels:
    {{- include "circuits_core.labels" . | nindent 4 }}
  {{- with .values.service.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- if .headless }}
  clusterIP: None
  {{- if not .readyOnly }}
  # Shards must be addressable while they start, so clients can wait on them.
  publishNotReadyAddresses: true
  {{- end }}
  {{- else }}
  type: {{ .values.service.type }}
  {{- end }}
  selector:
    {{- include "circuits.selectorLabels" . | nindent 4 }}
  ports:
    - name: {{ default "grpc" .portName }}
      port: {{ .values.service.port }}
      targetPort: {{ default "grpc" .portName }}
      protocol: TCP
      {{- if not .portName }}
      appProtocol: grpc
      {{- end }}
    {{- if .values.service.metricsPort }}
    - name: metrics
      port: {{ .values.service.metricsPort }}
      targetPort: metrics
      protocol: TCP
    {{- end }}
{{- end -}}

{{/* A chart-owned PVC: dict root, name, claimSuffix, spec ({size, storageClass, accessModes}). */}}
{{- define "circuits.pvc" -}}
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: {{ include "circuits.componentName" . }}-{{ .claimSuffix }}
  labels:
    {{- include "circuits_core.labels" . | nindent 4 }}
  annotations:
    helm.sh/resource-policy: keep
spec:
  accessModes:
    {{- toYaml .spec.accessModes | nindent 4 }}
  {{- if .spec.storageClass }}
  storageClassName: {{ .spec.storageClass | quote }}
  {{- end }}
  resources:
    requests:
      storage: {{ .spec.size }}
{{- end -}}

{{/* NetworkPolicy ingress of a gRPC server: dict values, clients (peers), metricsPeers. Returns {rules: [...]}. */}}
{{- define "circuits.networkPolicy.serverIngress" -}}
{{- $rules := list (dict "from" .clients "ports" (list (dict "protocol" "TCP" "port" (int .values.service.port)))) -}}
{{- if and .values.service.metricsPort .metricsPeers -}}
{{- $rules = append $rules (dict "from" .metricsPeers "ports" (list (dict "protocol" "TCP" "port" (int .values.service.metricsPort)))) -}}
{{- end -}}
{{- toYaml (dict "rules" $rules) -}}
{{- end -}}

{{/*
Flags of a client of this release's servers (the labeler calling attribution, the batch workers
calling the aggregator): with global.tls --<peer>-tls-ca (and the Secret's own pair as client
certificate under mutual TLS), with global.auth.clientToken --<peer>-token-file. Takes dict
root, peer, caller (names the caller when tokens are on but no client token is set).
Rendered as YAML list items ("" when there are none).
*/}}
{{- define "circuits.clientArgs" -}}
{{- $g := .root.Values.global -}}
{{- if and $g.auth.tokensSecret (not $g.auth.clientToken.secretName) -}}
{{- fail (printf "global.auth.clientToken.secretName is required with global.auth.tokensSecret: %s presents it (an existing Secret holding one of the tokens, with the write scope)" .caller) -}}
{{- end -}}
{{- $args := list -}}
{{- if $g.tls.secretName -}}
{{- $args = concat $args (list (printf "--%s-tls-ca" .peer) "/etc/circuits/tls/ca.crt") -}}
{{- if $g.tls.mutual -}}
{{- $args = concat $args (list (printf "--%s-tls-cert" .peer) "/etc/circuits/tls/tls.crt" (printf "--%s-tls-key" .peer) "/etc/circuits/tls/tls.key") -}}
{{- end -}}
{{- end -}}
{{- if $g.auth.clientToken.secretName -}}
{{- $args = concat $args (list (printf "--%s-token-file" .peer) "/etc/circuits/client-auth/token") -}}
{{- end -}}
{{- if $args }}{{ toYaml $args }}{{ end -}}
{{- end -}}

{{/* The client token volume (global.auth.clientToken, key projected to "token"; "" when unset). */}}
{{- define "circuits.clientTokenVolume" -}}
{{- with .root.Values.global.auth.clientToken }}
{{- if .secretName }}
- name: client-token
  secret:
    secretName: {{ .secretName }}
    items:
      - key: {{ .secretKey }}
        path: token
    defaultMode: 0440
{{- end }}
{{- end }}
{{- end -}}

{{- define "circuits.clientTokenVolumeMount" -}}
{{- if .root.Values.global.auth.clientToken.secretName }}
- name: client-token
  mountPath: /etc/circuits/client-auth
  readOnly: true
{{- end }}
{{- end -}}
