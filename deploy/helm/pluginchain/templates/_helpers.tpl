{{/*
Names, labels and checks shared by the templates, so every resource is named and labelled alike
and the operator's selectors and the Services' selectors cannot drift apart.
*/}}

{{- define "pluginchain.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pluginchain.fullname" -}}
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

{{/* Resource names: the suffixes leave room in the 63 characters of a label value. */}}
{{- define "pluginchain.operatorName" -}}
{{- printf "%s-operator" (include "pluginchain.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{- define "pluginchain.gatewayName" -}}
{{- printf "%s-gateway" (include "pluginchain.fullname" . | trunc 47 | trimSuffix "-") }}
{{- end }}

{{- define "pluginchain.envoyConfigName" -}}
{{- printf "%s-envoy" (include "pluginchain.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{- define "pluginchain.tokenSecretName" -}}
{{- if .Values.pushToken.existingSecret }}
{{- .Values.pushToken.existingSecret }}
{{- else }}
{{- printf "%s-push-token" (include "pluginchain.fullname" . | trunc 52 | trimSuffix "-") }}
{{- end }}
{{- end }}

{{- define "pluginchain.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "pluginchain.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels: never change them in an upgrade, Deployments' selectors are immutable. */}}
{{- define "pluginchain.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pluginchain.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pluginchain.operatorSelectorLabels" -}}
{{ include "pluginchain.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "pluginchain.gatewaySelectorLabels" -}}
{{ include "pluginchain.selectorLabels" . }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "pluginchain.image" -}}
{{- printf "%s:%s" .image.repository (default .chart.AppVersion .image.tag) }}
{{- end }}

{{/* The hardening every container of the chart gets. */}}
{{- define "pluginchain.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "pluginchain.podSecurityContext" -}}
runAsNonRoot: true
# The images' user (see deploy/docker/*.Dockerfile; the distroless Envoy image uses the same id).
runAsUser: 65532
runAsGroup: 65532
# Lets the non-root user read the push token (mounted with mode 0440).
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Where the push token Secret is mounted, in the operator and the sidecars alike. */}}
{{- define "pluginchain.tokenDir" -}}/var/run/pluginchain{{- end }}
