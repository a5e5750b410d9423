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

{{/*
The Secret with the NATS users' passwords (keys gateway-password, inference-password), or "" when the services
connect without credentials: jobs.nats.auth.existingSecret, else the chart's own (for the chart's own server).
*/}}
{{- define "inferencehub.natsAuthSecret" -}}
{{- $nats := .Values.jobs.nats -}}
{{- if and .Values.jobs.enabled $nats.auth.enabled -}}
{{- if $nats.auth.existingSecret -}}
{{ $nats.auth.existingSecret }}
{{- else if not $nats.url -}}
{{ include "inferencehub.natsName" . }}-auth
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The Secret with ca.crt (and, for the chart's own server, tls.crt and tls.key), or "" with TLS off. */}}
{{- define "inferencehub.natsTlsSecret" -}}
{{- $tls := .Values.jobs.nats.tls -}}
{{- if and .Values.jobs.enabled $tls.enabled -}}
{{ required "jobs.nats.tls.secretName: a Secret with tls.crt, tls.key and ca.crt (jobs.nats.tls.enabled is true)" $tls.secretName }}
{{- end -}}
{{- end -}}

{{/* Env for the gateway ("gateway") or the replicas ("inference"); nothing when jobs are off. */}}
{{- define "inferencehub.jobsEnv" -}}
{{- $jobs := .root.Values.jobs -}}
{{- if $jobs.enabled }}
- name: INFERENCEHUB_NATS_URL
  value: {{ include "inferencehub.natsUrl" .root | quote }}
{{- with include "inferencehub.natsAuthSecret" .root }}
- name: INFERENCEHUB_NATS_USER
  value: {{ index $jobs.nats.auth (printf "%sUser" $.component) | quote }}
- name: INFERENCEHUB_NATS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.component }}-password
{{- end }}
{{- if include "inferencehub.natsTlsSecret" .root }}
- name: INFERENCEHUB_NATS_TLS_CA
  value: /etc/inferencehub/nats-tls/ca.crt
{{- end }}
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


{{/* The CA of TLS to NATS, mounted in the gateway and the replicas (nothing with TLS off). */}}
{{- define "inferencehub.natsTlsMounts" -}}
{{- if include "inferencehub.natsTlsSecret" . }}
- name: nats-tls
  mountPath: /etc/inferencehub/nats-tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "inferencehub.natsTlsVolumes" -}}
{{- with include "inferencehub.natsTlsSecret" . }}
- name: nats-tls
  secret:
    secretName: {{ . }}
    items:
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- end -}}

{{/*
The chart's NATS server config (jobs-nats.yaml). With auth, two users, each allowed the subjects its work needs and
no other: clients without credentials are refused, and neither user can delete or purge the stream or the bucket.
- gateway: publishes jobs (inferencehub.jobs.<model>); reads and writes job records and idempotency keys
  ($KV.<bucket>.> and the bucket's get API); creates, updates and reads the stream and the bucket, reads a job
  message for queue ages and deletes a cancelled job's message ($JS.API.STREAM.{CREATE,UPDATE,INFO,MSG.GET,
  MSG.DELETE} of those two streams only); subscribes to $KV.<bucket>.job.* to wait for a result.
- inference: reads the stream and the bucket (to wait for them), creates its models' durable consumers, pulls
  (CONSUMER.MSG.NEXT) and acknowledges ($JS.ACK.<stream>.>) jobs, and writes job records ($KV.<bucket>.job.*).
  It cannot queue a job, write an idempotency key, or change the stream or the bucket.
- both subscribe to _INBOX.> for the replies of their requests (nats-py's inbox prefix; a user can read another's
  replies there, which carry nothing it cannot read from the bucket itself, but cannot publish to them).
The passwords come from the pod's env ($GATEWAY_PASSWORD, $INFERENCE_PASSWORD), set from the Secret.
*/}}
{{- define "inferencehub.natsConfig" -}}
{{- $nats := .root.Values.jobs.nats -}}
{{- $stream := .stream -}}
{{- $kv := printf "KV_%s" .bucket -}}
port: {{ $nats.port }}
http_port: {{ $nats.monitorPort }}
max_payload: {{ $nats.maxPayloadBytes | int64 }}
jetstream {
  store_dir: "/data"
}
{{- if .tls }}
tls {
  cert_file: "/etc/nats-tls/tls.crt"
  key_file: "/etc/nats-tls/tls.key"
}
{{- end }}
{{- if .auth }}
authorization {
  users = [
    {
      user: {{ $nats.auth.gatewayUser | quote }}
      password: $GATEWAY_PASSWORD
      permissions {
        publish {
          allow: [
            "inferencehub.jobs.>"
            "$KV.{{ .bucket }}.>"
            "$JS.API.STREAM.CREATE.{{ $stream }}"
            "$JS.API.STREAM.UPDATE.{{ $stream }}"
            "$JS.API.STREAM.INFO.{{ $stream }}"
            "$JS.API.STREAM.MSG.GET.{{ $stream }}"
            "$JS.API.STREAM.MSG.DELETE.{{ $stream }}"
            "$JS.API.STREAM.CREATE.{{ $kv }}"
            "$JS.API.STREAM.UPDATE.{{ $kv }}"
            "$JS.API.STREAM.INFO.{{ $kv }}"
            "$JS.API.STREAM.MSG.GET.{{ $kv }}"
            "$JS.API.DIRECT.GET.{{ $kv }}"
            "$JS.API.DIRECT.GET.{{ $kv }}.>"
          ]
        }
        subscribe {
          allow: ["_INBOX.>", "$KV.{{ .bucket }}.job.*"]
        }
      }
    }
    {
      user: {{ $nats.auth.inferenceUser | quote }}
      password: $INFERENCE_PASSWORD
      permissions {
        publish {
          allow: [
            "$JS.API.STREAM.INFO.{{ $stream }}"
            "$JS.API.STREAM.INFO.{{ $kv }}"
            "$JS.API.CONSUMER.DURABLE.CREATE.{{ $stream }}.*"
            "$JS.API.CONSUMER.CREATE.{{ $stream }}.>"
            "$JS.API.CONSUMER.INFO.{{ $stream }}.*"
            "$JS.API.CONSUMER.MSG.NEXT.{{ $stream }}.*"
            "$JS.ACK.{{ $stream }}.>"
            "$KV.{{ .bucket }}.job.*"
            "$JS.API.STREAM.MSG.GET.{{ $kv }}"
            "$JS.API.DIRECT.GET.{{ $kv }}"
            "$JS.API.DIRECT.GET.{{ $kv }}.>"
          ]
        }
        subscribe {
          allow: ["_INBOX.>"]
        }
      }
    }
  ]
}
{{- end }}
{{- end -}}
