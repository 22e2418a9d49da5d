{{/* The namespace every object goes to, and the one in the SPIFFE identities. */}}
{{- define "ragloom.namespace" -}}
{{- .Values.trafficPolicy.namespace | default .Release.Namespace -}}
{{- end -}}

{{/* Services run as Deployments (the indexer is a StatefulSet per shard). */}}
{{- define "ragloom.deployments" -}}
router embedder generator
{{- end -}}

{{/* The services that are NATS' clients (AuthorizationPolicy and NetworkPolicy of the NATS this chart runs). */}}
{{- define "ragloom.natsClients" -}}
router indexer
{{- end -}}

{{/* Labels on every object. */}}
{{- define "ragloom.commonLabels" -}}
app.kubernetes.io/part-of: ragloom
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels of one service's objects: ctx = dict "root" $ "service" name. */}}
{{- define "ragloom.labels" -}}
{{ include "ragloom.commonLabels" .root }}
app: {{ .service }}
app.kubernetes.io/name: {{ .service }}
{{- end -}}

{{/* The ServiceAccount name of a service. */}}
{{- define "ragloom.serviceAccount" -}}
{{- $sa := index .root.Values.trafficPolicy.serviceAccounts .service -}}
{{- required (printf "trafficPolicy.serviceAccounts.%s is required" .service) $sa -}}
{{- end -}}

{{/* The ingress gateway's namespace (trafficPolicy.gateway.namespace; "" = the release namespace):
where the chart's own gateway runs (gateway.deploy), and where everything that selects its pods lives. */}}
{{- define "ragloom.gatewayNamespace" -}}
{{- .Values.trafficPolicy.gateway.namespace | default (include "ragloom.namespace" .) -}}
{{- end -}}

{{/* The ingress gateway's ServiceAccount (its identity), required. */}}
{{- define "ragloom.gatewayServiceAccount" -}}
{{- required "trafficPolicy.gateway.serviceAccount is required" .Values.trafficPolicy.gateway.serviceAccount -}}
{{- end -}}

{{/* Istio principal (SPIFFE id without the scheme) of a caller: a service name or "gateway". */}}
{{- define "ragloom.principal" -}}
{{- $tp := .root.Values.trafficPolicy -}}
{{- if eq .service "gateway" -}}
{{- printf "%s/ns/%s/sa/%s" $tp.trustDomain (include "ragloom.gatewayNamespace" .root) (include "ragloom.gatewayServiceAccount" .root) -}}
{{- else -}}
{{- printf "%s/ns/%s/sa/%s" $tp.trustDomain (include "ragloom.namespace" .root) (include "ragloom.serviceAccount" .) -}}
{{- end -}}
{{- end -}}

{{/* Full host name of a Service in this namespace. */}}
{{- define "ragloom.host" -}}
{{- printf "%s.%s.svc.cluster.local" .service (include "ragloom.namespace" .root) -}}
{{- end -}}

{{/* Whether a canary of the service is deployed: "true" or "". */}}
{{- define "ragloom.canaryEnabled" -}}
{{- $c := index .root.Values.trafficPolicy.canary .service | default dict -}}
{{- if $c.enabled }}true{{ end -}}
{{- end -}}

{{/* The full name of a service's gRPC service (its proto's package and service), e.g. ragloom.router.v1.RouterService. */}}
{{- define "ragloom.grpcService" -}}
{{- printf "ragloom.%s.v1.%sService" . (title .) -}}
{{- end -}}

{{/* A route's retries: attempts 0 renders as {attempts: 0}, which Istio reads as "never retry". */}}
{{- define "ragloom.retries" -}}
{{- if gt (int .attempts) 0 -}}
retries:
  attempts: {{ int .attempts }}
  perTryTimeout: {{ .perTryTimeout }}
  retryOn: {{ join "," .retryOn }}
{{- else -}}
retries: {attempts: 0}
{{- end -}}
{{- end -}}

{{/*
The retry classes of a service, as YAML: a list of {name, methods, retries}. Reads
(trafficPolicy.methods.<service>.noSideEffects) get `retries`, idempotent writes
`idempotentRetries`, and the last class, methods [] (every other method, and any path that is
no gRPC method), `unsafeRetries`. Each is merged over the service's own retries
(services.<service>.retries over trafficPolicy.retries), as mesh/policy.py does.
*/}}
{{- define "ragloom.retryClasses" -}}
{{- $tp := .root.Values.trafficPolicy -}}
{{- $svc := index ($tp.services | default dict) .service | default dict -}}
{{- /* key by key, not sprig's merge: that takes attempts 0 for unset and fills it in from below */ -}}
{{- $base := deepCopy $tp.retries -}}
{{- range $k, $v := $svc.retries | default dict }}{{ $_ := set $base $k $v }}{{ end -}}
{{- $idempotent := deepCopy $base -}}
{{- range $k, $v := $tp.idempotentRetries | default (dict "attempts" 0) }}{{ $_ := set $idempotent $k $v }}{{ end -}}
{{- $unsafe := deepCopy $base -}}
{{- range $k, $v := $tp.unsafeRetries | default (dict "attempts" 0) }}{{ $_ := set $unsafe $k $v }}{{ end -}}
{{- $methods := index ($tp.methods | default dict) .service | default dict -}}
{{- $classes := list
      (dict "name" "reads" "methods" ($methods.noSideEffects | default list) "retries" $base)
      (dict "name" "idempotent" "methods" ($methods.idempotent | default list) "retries" $idempotent)
      (dict "name" "" "methods" list "retries" $unsafe) -}}
{{- toYaml $classes -}}
{{- end -}}

{{/*
HTTP routes to a service, one group per retry class: the reads, the idempotent writes (each
matched on its gRPC path /<package>.<Service>/<Method>), then everything else. Within a
group, the canary header first, then the weighted split. The last group matches any path:
REST calls at the gateway are routed on their gRPC path (the transcoder rewrites :path and
clears the route cache), and whatever it does not transcode still reaches the service.
*/}}
{{- define "ragloom.routes" -}}
{{- $tp := .root.Values.trafficPolicy -}}
{{- $service := .service -}}
{{- $host := include "ragloom.host" . -}}
{{- $port := .root.Values.grpcPort -}}
{{- $svc := index ($tp.services | default dict) $service | default dict -}}
{{- $timeout := required (printf "trafficPolicy.services.%s.timeout is required" $service) $svc.timeout -}}
{{- $grpcService := include "ragloom.grpcService" $service -}}
{{- $canary := include "ragloom.canaryEnabled" . -}}
{{- $weight := 0 -}}
{{- if $canary -}}
{{- $weight = int (index $tp.canary $service).weight -}}
{{- if or (lt $weight 0) (gt $weight 100) }}{{ fail (printf "trafficPolicy.canary.%s.weight must be 0..100" $service) }}{{ end -}}
{{- end -}}
{{- range $class := fromYamlArray (include "ragloom.retryClasses" .) }}
{{- if or $class.methods (not $class.name) }}
{{- $name := $service }}
{{- $uri := "" }}
{{- if $class.name }}
{{- $name = printf "%s-%s" $service $class.name }}
{{- range $method := $class.methods }}
{{- if not (regexMatch "^[A-Za-z_][A-Za-z0-9_]*$" (toString $method)) }}{{ fail (printf "trafficPolicy.methods.%s: %q is not a gRPC method name" $service $method) }}{{ end }}
{{- end }}
{{- $uri = printf "^/%s/(%s)$" (replace "." "\\." $grpcService) (join "|" $class.methods) }}
{{- end }}
{{- $policy := printf "timeout: %s\n%s" $timeout (include "ragloom.retries" $class.retries) }}
{{- if $canary }}
- name: {{ $name }}-canary-header
  match:
    - headers:
        {{ $tp.canary.header.name }}:
          exact: {{ $tp.canary.header.value | quote }}
      {{- with $uri }}
      uri:
        regex: {{ toJson . }}
      {{- end }}
  route:
    - destination: {host: {{ $host }}, subset: canary, port: {number: {{ $port }}}}
  {{- $policy | nindent 2 }}
- name: {{ $name }}-weighted
  {{- with $uri }}
  match:
    - uri:
        regex: {{ toJson . }}
  {{- end }}
  route:
    - destination: {host: {{ $host }}, subset: stable, port: {number: {{ $port }}}}
      weight: {{ sub 100 $weight }}
    - destination: {host: {{ $host }}, subset: canary, port: {number: {{ $port }}}}
      weight: {{ $weight }}
  {{- $policy | nindent 2 }}
{{- else }}
- name: {{ $name }}
  {{- with $uri }}
  match:
    - uri:
        regex: {{ toJson . }}
  {{- end }}
  route:
    - destination: {host: {{ $host }}, subset: stable, port: {number: {{ $port }}}}
      weight: 100
  {{- $policy | nindent 2 }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The gateway pod's listener ports ragloom's Gateway serves on: HTTP, and HTTPS when it has a certificate. */}}
{{- define "ragloom.gatewayListenerPorts" -}}
{{- $gw := .Values.gateway -}}
{{- $ports := list (int $gw.listenerPort) -}}
{{- if $gw.tls.credentialName }}{{ $ports = append $ports (int $gw.tls.listenerPort) }}{{ end -}}
{{- toJson $ports -}}
{{- end -}}

{{/*
Where ragloom's HTTP filters go on the gateway, as a JSON list of EnvoyFilter listener matches. The
chart's own gateway (gateway.deploy) serves ragloom's Gateway alone: one match, every listener it
has. A shared gateway (deploy off) gets one per ragloom listener port, and its other ports are left alone.
*/}}
{{- define "ragloom.gatewayListeners" -}}
{{- if .Values.gateway.deploy -}}
{{- list (dict) | toJson -}}
{{- else -}}
{{- $out := list -}}
{{- range $port := include "ragloom.gatewayListenerPorts" . | fromJsonArray }}{{ $out = append $out (dict "portNumber" (int $port)) }}{{ end -}}
{{- toJson $out -}}
{{- end -}}
{{- end -}}

{{/* The labels of the ingress gateway's pods (gateway.selector), required. */}}
{{- define "ragloom.gatewaySelector" -}}
{{- toYaml (required "gateway.selector is required (the labels of the ingress gateway's pods)" .Values.gateway.selector) -}}
{{- end -}}

{{/* Where the chart's gateway mounts the router's descriptor set (the ConfigMap ragloom-gateway-descriptors). */}}
{{- define "ragloom.descriptorDir" -}}
/etc/ragloom/descriptors
{{- end -}}

{{/* The chart's router-only descriptor set (files/router.pb, made by protos/generate.py), required. */}}
{{- define "ragloom.descriptorSet" -}}
{{- $descriptor := .Files.Get "files/router.pb" -}}
{{- if not $descriptor }}{{ fail "files/router.pb is missing from the chart: run python protos/generate.py" }}{{ end -}}
{{- $descriptor -}}
{{- end -}}

{{/*
The effective least number of pods of a workload: its HPA's minReplicas when autoscaling is on, else
its replicas. ctx = the workload's values (router, embedder, generator, gateway).
*/}}
{{- define "ragloom.minReplicas" -}}
{{- $a := .autoscaling | default dict -}}
{{- if $a.enabled }}{{ int $a.minReplicas }}{{ else }}{{ int .replicas }}{{ end -}}
{{- end -}}

{{/* The container image: the service's own image over the global one; ctx adds "tag" for a canary. */}}
{{- define "ragloom.image" -}}
{{- $values := index .root.Values .service -}}
{{- $image := merge (deepCopy ($values.image | default dict)) (deepCopy .root.Values.image) -}}
{{- $tag := .tag | default $image.tag | default .root.Chart.AppVersion -}}
{{- printf "%s:%s" $image.repository $tag -}}
{{- end -}}

{{/* Env entries from a map of RAGLOOM_* settings. */}}
{{- define "ragloom.extraEnv" -}}
{{- range $name, $value := . }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end -}}

{{/* The flags every service gets, as RAGLOOM_* variables, and writable cache folders: ctx = root + service. */}}
{{- define "ragloom.baseEnv" -}}
{{- $v := .root.Values -}}
- name: RAGLOOM_HOST
  value: "0.0.0.0"
- name: RAGLOOM_PORT
  value: {{ $v.grpcPort | quote }}
- name: RAGLOOM_METRICS_PORT
  value: {{ $v.metricsPort | quote }}
- name: RAGLOOM_GRACE_S
  value: {{ $v.graceSeconds | quote }}
- name: RAGLOOM_LOG_LEVEL
  value: {{ $v.logLevel | quote }}
# The root filesystem is read-only: caches go to the scratch volume.
- name: HOME
  value: {{ $v.scratch.cacheMountPath | quote }}
- name: HF_HOME
  value: {{ printf "%s/huggingface" $v.scratch.cacheMountPath | quote }}
{{- if ne .service "embedder" }}
- name: XDG_CACHE_HOME
  value: {{ $v.scratch.cacheMountPath | quote }}
{{- else }}
# XDG_CACHE_HOME stays the image's: the fp32 ONNX graph baked there is read from it.
{{- end }}
{{- end -}}

{{/* gRPC health probes: liveness and startup on the server as a whole, readiness on the service. */}}
{{- define "ragloom.probes" -}}
{{- $p := .root.Values.probes -}}
startupProbe:
  grpc: {port: {{ .root.Values.grpcPort }}}
  {{- toYaml $p.startup | nindent 2 }}
livenessProbe:
  grpc: {port: {{ .root.Values.grpcPort }}}
  {{- toYaml $p.liveness | nindent 2 }}
readinessProbe:
  grpc:
    port: {{ .root.Values.grpcPort }}
    service: {{ .grpcService }}
  {{- toYaml $p.readiness | nindent 2 }}
{{- end -}}

{{/* Container ports. */}}
{{- define "ragloom.containerPorts" -}}
- name: grpc
  containerPort: {{ .Values.grpcPort }}
  protocol: TCP
- name: http-metrics
  containerPort: {{ .Values.metricsPort }}
  protocol: TCP
{{- end -}}

{{/* Pod annotations: Istio settings and Prometheus scraping (merged through the sidecar). */}}
{{- define "ragloom.podAnnotations" -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.metricsPort | quote }}
prometheus.io/path: /metrics
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Scratch volumes for the read-only root filesystem. */}}
{{- define "ragloom.scratchVolumes" -}}
- name: tmp
  emptyDir: {sizeLimit: {{ .Values.scratch.tmpSizeLimit }}}
- name: cache
  emptyDir: {sizeLimit: {{ .Values.scratch.cacheSizeLimit }}}
{{- end -}}

{{- define "ragloom.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: {{ .Values.scratch.cacheMountPath }}
{{- end -}}

{{/* nodeSelector / tolerations / affinity of a service, with its GPU settings when enabled. */}}
{{- define "ragloom.scheduling" -}}
{{- $v := index .root.Values .service -}}
{{- $gpu := $v.gpu | default dict -}}
{{- $nodeSelector := deepCopy ($v.nodeSelector | default dict) -}}
{{- $tolerations := $v.tolerations | default list -}}
{{- if $gpu.enabled -}}
{{- $nodeSelector = merge $nodeSelector ($gpu.nodeSelector | default dict) -}}
{{- $tolerations = concat $tolerations ($gpu.tolerations | default list) -}}
{{- end -}}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Container resources of a service, with nvidia.com/gpu when its GPU is enabled. */}}
{{- define "ragloom.resources" -}}
{{- $v := index .root.Values .service -}}
{{- $resources := deepCopy ($v.resources | default dict) -}}
{{- $gpu := $v.gpu | default dict -}}
{{- if $gpu.enabled -}}
{{- $limits := merge (dict "nvidia.com/gpu" (int $gpu.count)) ($resources.limits | default dict) -}}
{{- $_ := set $resources "limits" $limits -}}
{{- end -}}
{{- toYaml $resources -}}
{{- end -}}

{{/* The shards' log: nats.url, else the NATS this chart deploys, else "" (no log). */}}
{{- define "ragloom.natsUrl" -}}
{{- if .Values.nats.url -}}
{{- .Values.nats.url -}}
{{- else if .Values.nats.deploy -}}
{{- printf "nats://nats.%s.svc:4222" (include "ragloom.namespace" .) -}}
{{- end -}}
{{- end -}}

{{/* The TCP port of a URL: its own, else its scheme's (http 80, https 443), else ctx "default". ctx = dict "url" "default". */}}
{{- define "ragloom.urlPort" -}}
{{- $u := urlParse .url -}}
{{- $explicit := regexFind ":[0-9]+$" $u.host -}}
{{- if $explicit -}}
{{- trimPrefix ":" $explicit -}}
{{- else if eq $u.scheme "https" -}}
443
{{- else if eq $u.scheme "http" -}}
80
{{- else -}}
{{- .default -}}
{{- end -}}
{{- end -}}
