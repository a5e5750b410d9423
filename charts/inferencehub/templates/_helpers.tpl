{{/*
The release's base name for every object: fullnameOverride, or "<release>-<name>" (just the release name when it
already contains the chart's name). It is kept to 44 characters, so that the longest derived name
("<base>-inference-headless", and the label key "<base>-inference-client") still fits the 63 characters of a
DNS label and a label key: a longer base is cut to 35 characters plus "-" and 8 characters of its sha256, so two
long release names that share a prefix still get different names.
*/}}
{{- define "inferencehub.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "inferencehub.fullname" -}}
{{- $name := include "inferencehub.name" . -}}
{{- $full := "" -}}
{{- if .Values.fullnameOverride -}}
{{- $full = .Values.fullnameOverride -}}
{{- else if contains $name .Release.Name -}}
{{- $full = .Release.Name -}}
{{- else -}}
{{- $full = printf "%s-%s" .Release.Name $name -}}
{{- end -}}
{{- if gt (len $full) 44 -}}
{{- $full = printf "%s-%s" ($full | trunc 35 | trimSuffix "-") ($full | sha256sum | trunc 8) -}}
{{- end -}}
{{- $full | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select one component's pods: fixed for the life of a release. */}}
{{- define "inferencehub.selectorLabels" -}}
app.kubernetes.io/name: {{ include "inferencehub.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Standard labels plus the component, for objects (not pod templates: a chart bump must not restart pods). */}}
{{- define "inferencehub.labels" -}}
{{ include "inferencehub.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{/* A component's pod template metadata: selector labels, the user's pod labels and annotations. */}}
{{- define "inferencehub.podMetadata" -}}
{{- $values := index .root.Values .component -}}
labels:
  {{- include "inferencehub.selectorLabels" . | nindent 2 }}
  {{- with $values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  {{- if eq .component "gateway" }}
  {{- include "inferencehub.clientLabel" .root | nindent 2 }}
  {{- end }}
{{- if or $values.podAnnotations .annotations }}
annotations:
  {{- with $values.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  {{- with .annotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* Pod-level settings both components share: service account, pull secrets, priority, spreading. */}}
{{- define "inferencehub.podCommon" -}}
{{- $values := index .root.Values .component -}}
serviceAccountName: {{ include "inferencehub.serviceAccountName" .root }}
automountServiceAccountToken: false
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- if $values.topologySpread.enabled }}
topologySpreadConstraints:
  {{- range $values.topologySpread.topologyKeys }}
  - maxSkew: {{ $values.topologySpread.maxSkew }}
    topologyKey: {{ . }}
    whenUnsatisfiable: {{ $values.topologySpread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "inferencehub.selectorLabels" $ | nindent 8 }}
    matchLabelKeys: [pod-template-hash]
  {{- end }}
{{- end }}
{{- end -}}

{{- define "inferencehub.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "inferencehub.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* A component's image: registry prefix, repository, tag (default: appVersion). */}}
{{- define "inferencehub.image" -}}
{{- $values := index .root.Values .component -}}
{{- printf "%s%s:%s" .root.Values.image.registry $values.image.repository (default .root.Chart.AppVersion $values.image.tag) -}}
{{- end -}}

{{- define "inferencehub.headlessName" -}}
{{ include "inferencehub.fullname" . }}-inference-headless
{{- end -}}

{{/* The gateway's gRPC target: every ready inference pod, by DNS on the headless Service. */}}
{{- define "inferencehub.upstream" -}}
dns:///{{ include "inferencehub.headlessName" . }}.{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}:{{ .Values.inference.port }}
{{- end -}}

{{/* Pods that may call the inference service's gRPC port (with the NetworkPolicy on). */}}
{{- define "inferencehub.clientLabel" -}}
{{ include "inferencehub.fullname" . }}-inference-client: "true"
{{- end -}}

{{/*
The pod security context of every pod the chart makes (it takes the root context, so any template can use it).
Always runAsNonRoot; the ids are the images' (10001) unless securityContext.platformAssignsIds leaves all of them
to the platform (OpenShift's restricted SCC assigns each namespace's uid and gid, and rejects pods naming others),
or a null runAsUser or runAsGroup leaves out that one (fsGroup follows runAsGroup).
*/}}
{{- define "inferencehub.podSecurityContext" -}}
{{- $sc := .Values.securityContext -}}
runAsNonRoot: true
{{- if not $sc.platformAssignsIds }}
{{- with $sc.runAsUser }}
runAsUser: {{ . }}
{{- end }}
{{- with $sc.runAsGroup }}
runAsGroup: {{ . }}
fsGroup: {{ . }}
{{- end }}
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "inferencehub.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* Extra env from values (name: value). */}}
{{- define "inferencehub.extraEnv" -}}
{{- range $name, $value := . }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- end -}}

{{/* The replicas a component keeps at least: the HPA's minimum when it scales, else its replica count. */}}
{{- define "inferencehub.minReplicas" -}}
{{- $values := index .root.Values .component -}}
{{- if $values.autoscaling.enabled -}}{{ $values.autoscaling.minReplicas }}{{- else -}}{{ $values.replicas }}{{- end -}}
{{- end -}}

{{/* How long calls on a replica's aged connection get to finish: the value, or else the longest deadline. */}}
{{- define "inferencehub.connectionAgeGrace" -}}
{{- $grace := .Values.inference.maxConnectionAgeGraceSeconds -}}
{{- if kindIs "invalid" $grace -}}{{ .Values.gateway.maxDeadlineSeconds }}{{- else -}}{{ $grace }}{{- end -}}
{{- end -}}

{{/* A proxy's timeout in front of the gateway, whole seconds: the longest deadline plus the margin, so the
gateway ends an over-long call or stream (with a final event), never the proxy (a cut connection). */}}
{{- define "inferencehub.proxyTimeoutSeconds" -}}
{{- add (int (ceil .Values.gateway.maxDeadlineSeconds)) .Values.gateway.proxyTimeoutMarginSeconds -}}
{{- end -}}

{{/*
Invariants the schema cannot express, checked at render time (helm install/upgrade/template fail with the message).
*/}}
{{- define "inferencehub.validate" -}}
{{- if gt (float64 .Values.gateway.deadlineSeconds) (float64 .Values.gateway.maxDeadlineSeconds) }}
{{- fail (printf "gateway.deadlineSeconds (%v s) is longer than gateway.maxDeadlineSeconds (%v s), the longest deadline a call may have" .Values.gateway.deadlineSeconds .Values.gateway.maxDeadlineSeconds) }}
{{- end }}
{{- $ageGrace := include "inferencehub.connectionAgeGrace" . }}
{{- if gt (float64 .Values.gateway.maxDeadlineSeconds) (float64 $ageGrace) }}
{{- fail (printf "inference.maxConnectionAgeGraceSeconds (%v s) is shorter than gateway.maxDeadlineSeconds (%v s): calls inside their deadline would be cut when their connection ages out; leave it empty (= the longest deadline) or raise it" $ageGrace .Values.gateway.maxDeadlineSeconds) }}
{{- end }}
{{- if .Values.gateway.ingress.enabled }}
{{- range $key := list "proxy-read-timeout" "proxy-send-timeout" }}
{{- $set := toString (index ($.Values.gateway.ingress.annotations | default dict) (printf "nginx.ingress.kubernetes.io/%s" $key) | default "") }}
{{- if and (regexMatch "^[0-9]+$" $set) (lt (float64 $set) (float64 $.Values.gateway.maxDeadlineSeconds)) }}
{{- fail (printf "gateway.ingress.annotations nginx.ingress.kubernetes.io/%s (%s s) is shorter than gateway.maxDeadlineSeconds (%v s): the proxy would cut streams and calls inside their deadline; remove it (the chart derives it) or raise it" $key $set $.Values.gateway.maxDeadlineSeconds) }}
{{- end }}
{{- end }}
{{- end }}
{{- range $component := list "gateway" "inference" }}
{{- $v := index $.Values $component }}
{{- $stop := addf $v.preStopSeconds $v.drainSeconds $v.graceSeconds }}
{{- if ge (float64 $stop) (float64 $v.terminationGracePeriodSeconds) }}
{{- fail (printf "%s: preStopSeconds + drainSeconds + graceSeconds (%v s) must be less than terminationGracePeriodSeconds (%v s), or pods are killed mid-drain" $component $stop $v.terminationGracePeriodSeconds) }}
{{- end }}
{{- if gt (float64 $.Values.gateway.maxDeadlineSeconds) (float64 $v.graceSeconds) }}
{{- fail (printf "%s.graceSeconds (%v s) is shorter than gateway.maxDeadlineSeconds (%v s): calls still allowed to run would be cut on every rollout" $component $v.graceSeconds $.Values.gateway.maxDeadlineSeconds) }}
{{- end }}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- fail (printf "%s.autoscaling: minReplicas (%v) is greater than maxReplicas (%v)" $component $v.autoscaling.minReplicas $v.autoscaling.maxReplicas) }}
{{- end }}
{{- if $v.pdb.enabled }}
{{- $min := int (include "inferencehub.minReplicas" (dict "root" $ "component" $component)) }}
{{- if hasKey $v.pdb "minAvailable" }}
{{- $m := toString $v.pdb.minAvailable }}
{{- if or (eq $m "100%") (and (not (hasSuffix "%" $m)) (ge (int $m) $min)) }}
{{- fail (printf "%s.pdb.minAvailable (%s) leaves no pod to evict with %d replicas: every node drain would block" $component $m $min) }}
{{- end }}
{{- else }}
{{- $m := toString $v.pdb.maxUnavailable }}
{{- if or (eq $m "0") (eq $m "0%") }}
{{- fail (printf "%s.pdb.maxUnavailable is %s: every node drain would block" $component $m) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}
