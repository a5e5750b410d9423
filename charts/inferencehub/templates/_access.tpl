{{/* Who may call: API keys and rate limits at the gateway, mutual TLS to the replicas (values: auth, tls). */}}

{{- define "inferencehub.tlsDir" -}}/etc/inferencehub/tls{{- end -}}
{{- define "inferencehub.apiKeysDir" -}}/etc/inferencehub/api-keys{{- end -}}

{{- define "inferencehub.inferenceTlsSecret" -}}
{{- default (printf "%s-inference-tls" (include "inferencehub.fullname" .)) .Values.tls.inferenceSecret -}}
{{- end -}}

{{- define "inferencehub.gatewayTlsSecret" -}}
{{- default (printf "%s-gateway-tls" (include "inferencehub.fullname" .)) .Values.tls.gatewaySecret -}}
{{- end -}}

{{- define "inferencehub.apiKeysSecret" -}}
{{- default (printf "%s-api-keys" (include "inferencehub.fullname" .)) .Values.auth.apiKeys.existingSecret -}}
{{- end -}}

{{/* The names the replicas' certificate must carry: the headless Service (the gateway's target), the ClusterIP
Service, and localhost (grpcurl through kubectl port-forward). */}}
{{- define "inferencehub.inferenceDnsNames" -}}
{{- $ns := .Release.Namespace -}}
{{- range $name := list (include "inferencehub.headlessName" .) (printf "%s-inference" (include "inferencehub.fullname" .)) }}
- {{ $name }}.{{ $ns }}.svc.{{ $.Values.clusterDomain }}
- {{ $name }}.{{ $ns }}.svc
- {{ $name }}
{{- end }}
- localhost
{{- end -}}

{{/* The gateway's identity: a DNS name its client certificate carries (the chart's Certificate asks for it), the
one the replicas serve (INFERENCEHUB_TLS_CLIENT_NAMES, with tls.extraClientNames). */}}
{{- define "inferencehub.gatewayTlsName" -}}
{{- default (printf "%s-gateway.%s.svc.%s" (include "inferencehub.fullname" .) .Release.Namespace .Values.clusterDomain) .Values.tls.gatewayName -}}
{{- end -}}

{{/* The port the inference probes use: the plaintext health-only port with TLS on, else the gRPC port. */}}
{{- define "inferencehub.probePort" -}}
{{- if .Values.tls.enabled }}{{ .Values.tls.healthPort }}{{ else }}{{ .Values.inference.port }}{{ end -}}
{{- end -}}

{{/* --- the inference container --- */}}

{{- define "inferencehub.inferenceTlsEnv" -}}
{{- if .Values.tls.enabled }}
- name: INFERENCEHUB_TLS_CERT
  value: {{ include "inferencehub.tlsDir" . }}/tls.crt
- name: INFERENCEHUB_TLS_KEY
  value: {{ include "inferencehub.tlsDir" . }}/tls.key
- name: INFERENCEHUB_TLS_CLIENT_CA
  value: {{ include "inferencehub.tlsDir" . }}/ca.crt
- name: INFERENCEHUB_TLS_CLIENT_NAMES
  value: {{ prepend .Values.tls.extraClientNames (include "inferencehub.gatewayTlsName" .) | join "," | quote }}
- name: INFERENCEHUB_HEALTH_PORT
  value: {{ .Values.tls.healthPort | int | quote }}
{{- end }}
{{- end -}}

{{- define "inferencehub.inferenceTlsPorts" -}}
{{- if .Values.tls.enabled }}
- name: health
  containerPort: {{ .Values.tls.healthPort }}
  protocol: TCP
{{- end }}
{{- end -}}

{{- define "inferencehub.tlsMounts" -}}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: {{ include "inferencehub.tlsDir" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* A Secret volume (never subPath: Secret updates then reach the files, and the processes re-read them). */}}
{{- define "inferencehub.tlsVolume" -}}
{{- if .root.Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ .secret }}
    defaultMode: 0440
    items:
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
      - {key: ca.crt, path: ca.crt}
{{- end }}
{{- end -}}

{{/* --- the gateway container --- */}}

{{- define "inferencehub.gatewayAccessEnv" -}}
{{- if .Values.auth.apiKeys.enabled }}
- name: INFERENCEHUB_API_KEYS_FILE
  value: {{ include "inferencehub.apiKeysDir" . }}/{{ .Values.auth.apiKeys.secretKey }}
{{- end }}
{{- if gt (float64 .Values.auth.rateLimit.requestsPerSecond) 0.0 }}
- name: INFERENCEHUB_RATE_LIMIT
  value: {{ .Values.auth.rateLimit.requestsPerSecond | quote }}
- name: INFERENCEHUB_RATE_LIMIT_BURST
  value: {{ .Values.auth.rateLimit.burst | int | quote }}
{{- end }}
{{- if .Values.tls.enabled }}
- name: INFERENCEHUB_UPSTREAM_TLS_CA
  value: {{ include "inferencehub.tlsDir" . }}/ca.crt
- name: INFERENCEHUB_UPSTREAM_TLS_CERT
  value: {{ include "inferencehub.tlsDir" . }}/tls.crt
- name: INFERENCEHUB_UPSTREAM_TLS_KEY
  value: {{ include "inferencehub.tlsDir" . }}/tls.key
{{- end }}
{{- end -}}

{{- define "inferencehub.gatewayAccessMounts" -}}
{{- include "inferencehub.tlsMounts" . }}
{{- if .Values.auth.apiKeys.enabled }}
- name: api-keys
  mountPath: {{ include "inferencehub.apiKeysDir" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "inferencehub.gatewayAccessVolumes" -}}
{{- include "inferencehub.tlsVolume" (dict "root" . "secret" (include "inferencehub.gatewayTlsSecret" .)) }}
{{- if .Values.auth.apiKeys.enabled }}
- name: api-keys
  secret:
    secretName: {{ include "inferencehub.apiKeysSecret" . }}
    defaultMode: 0440
    items:
      - key: {{ .Values.auth.apiKeys.secretKey }}
        path: {{ .Values.auth.apiKeys.secretKey }}
{{- end }}
{{- end -}}

{{/* helm test's gateway pod: the API key it sends, from a Secret (without one, keys on means a 401). */}}
{{- define "inferencehub.testApiKeyEnv" -}}
{{- $ref := .Values.auth.apiKeys.testKeySecret -}}
{{- if and .Values.auth.apiKeys.enabled $ref.name }}
env:
  - name: INFERENCEHUB_API_KEY
    valueFrom:
      secretKeyRef:
        name: {{ $ref.name }}
        key: {{ required "auth.apiKeys.testKeySecret.key is needed with testKeySecret.name" $ref.key }}
{{- end }}
{{- end -}}
