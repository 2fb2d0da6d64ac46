{{/*
Names and labels shared by the templates.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "distcache.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The object name prefix: fullnameOverride, else the release name when it already contains the chart name, else
"<release>-<chart>". Truncated so that "<fullname>-operator" fits the 63 characters of a label value.
*/}}
{{- define "distcache.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "distcache.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 54 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of the operator's Deployment, Service, ClusterRole and bindings. */}}
{{- define "distcache.operator.fullname" -}}
{{- printf "%s-operator" (include "distcache.fullname" .) -}}
{{- end -}}

{{/* "<chart>-<version>" for the helm.sh/chart label. */}}
{{- define "distcache.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Selector labels of the operator pods. The name differs from the cache nodes' "distcache" (set by the operator on
every DistCache's objects), so a DistCache named like the release never selects the operator pod.
*/}}
{{- define "distcache.operator.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-operator" (include "distcache.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every object of the chart. */}}
{{- define "distcache.labels" -}}
{{ include "distcache.operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "distcache.chart" . }}
{{- end -}}

{{/* The operator's ServiceAccount name. */}}
{{- define "distcache.operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "distcache.operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The operator image reference. */}}
{{- define "distcache.operator.image" -}}
{{- printf "%s:%s" .Values.operator.image.repository (.Values.operator.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* The default cache node image (operator flag --node-image). */}}
{{- define "distcache.node.image" -}}
{{- printf "%s:%s" .Values.node.image.repository (.Values.node.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
