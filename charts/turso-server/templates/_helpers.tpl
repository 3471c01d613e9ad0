{{- define "turso-server.fullname" -}}
{{- printf "%s-turso" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "turso-server.labels" -}}
app.kubernetes.io/name: turso-server
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "turso-server.selector" -}}
app.kubernetes.io/name: turso-server
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "turso-server.secret" -}}
{{- default (printf "%s-tokens" (include "turso-server.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "turso-server.securityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 9000
runAsGroup: 9000
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
