{{/* Async jobs (NATS JetStream): names and the env both components get. */}}

{{- define "inferencehub.natsName" -}}
{{ include "inferencehub.fullname" . }}-nats
{{- end -}}

{{/* The NATS URL: jobs.nats.url, or the chart's own single-node server. */}}
{{- define "inferencehub.natsUrl" -}}
{{- if .Values.jobs.nats.url -}}
{{ .Values.jobs.nats.url }}
{{- else -}}
nats://{{ include "inferencehub.natsName" . }}.{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}:{{ .Values.jobs.nats.port }}
{{- end -}}
{{- end -}}

{{/* NATS's monitoring endpoint (host:port), which KEDA's nats-jetstream scaler reads. */}}
{{- define "inferencehub.natsMonitoring" -}}
{{- if .Values.jobs.keda.monitoringEndpoint -}}
{{ .Values.jobs.keda.monitoringEndpoint }}
{{- else -}}
{{ include "inferencehub.natsName" . }}.{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}:{{ .Values.jobs.nats.monitorPort }}
{{- end -}}
{{- end -}}

{{/* Env for the gateway ("gateway") or the replicas ("inference"); nothing when jobs are off. */}}
{{- define "inferencehub.jobsEnv" -}}
{{- $jobs := .root.Values.jobs -}}
{{- if $jobs.enabled }}
- name: INFERENCEHUB_NATS_URL
  value: {{ include "inferencehub.natsUrl" .root | quote }}
{{- if eq .component "gateway" }}
- name: INFERENCEHUB_JOBS_MAX_QUEUE
  value: {{ $jobs.maxQueue | int | quote }}
- name: INFERENCEHUB_JOBS_TTL_SECONDS
  value: {{ $jobs.ttlSeconds | quote }}
- name: INFERENCEHUB_JOBS_REPLICAS
  value: {{ $jobs.streamReplicas | int | quote }}
{{- else }}
- name: INFERENCEHUB_JOBS_LEASE_SECONDS
  value: {{ $jobs.leaseSeconds | quote }}
- name: INFERENCEHUB_JOBS_MAX_ATTEMPTS
  value: {{ $jobs.maxAttempts | int | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* A model's subject token and durable consumer, as services/inferencehub/jobqueue.py names them. */}}
{{- define "inferencehub.jobConsumer" -}}
{{- if regexMatch "^[A-Za-z0-9_-]{1,100}$" . -}}
inferencehub-{{ . }}
{{- else -}}
inferencehub-={{ . | printf "%x" }}
{{- end -}}
{{- end -}}
