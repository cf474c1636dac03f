{{/* Chart name. */}}
{{- define "eventtermq.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release name, plus the chart name unless it already contains it. */}}
{{- define "eventtermq.fullname" -}}
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

{{/* Name of the operator's objects. */}}
{{- define "eventtermq.operatorName" -}}
{{- printf "%s-operator" (include "eventtermq.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "eventtermq.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "eventtermq.labels" -}}
helm.sh/chart: {{ include "eventtermq.chart" . }}
app.kubernetes.io/name: {{ include "eventtermq.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of the operator pods. */}}
{{- define "eventtermq.operatorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "eventtermq.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "eventtermq.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "eventtermq.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "eventtermq.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) }}
{{- end }}

{{- define "eventtermq.clusterImage" -}}
{{- printf "%s:%s" .Values.cluster.image.repository (default .Chart.AppVersion .Values.cluster.image.tag) }}
{{- end }}

{{- define "eventtermq.clusterName" -}}
{{- default (include "eventtermq.fullname" .) .Values.cluster.name }}
{{- end }}

{{/* "true" when the operator elects a leader: forced, or auto with more than one replica. */}}
{{- define "eventtermq.leaderElection" -}}
{{- $mode := .Values.operator.leaderElection }}
{{- if or (eq $mode "enabled") (and (eq $mode "auto") (gt (int .Values.operator.replicaCount) 1)) }}true{{ end }}
{{- end }}
