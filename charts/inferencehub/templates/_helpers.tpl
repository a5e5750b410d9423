{{/* The release's base name for every object. */}}
{{- define "inferencehub.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels that select one component's pods. */}}
{{- define "inferencehub.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Standard labels plus the component. */}}
{{- define "inferencehub.labels" -}}
{{ include "inferencehub.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
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

{{- define "inferencehub.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.runAsGroup }}
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
