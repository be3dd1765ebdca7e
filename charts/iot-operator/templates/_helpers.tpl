{{- define "iot-operator.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "iot-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "iot-operator.labels" -}}
app.kubernetes.io/name: {{ include "iot-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "iot-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "iot-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "iot-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "iot-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "iot-operator.leaderElection" -}}
{{- if or .Values.leaderElection.enabled (gt (int .Values.replicaCount) 1) .Values.bridgeSharding.enabled -}}true{{- else -}}false{{- end -}}
{{- end -}}

{{/* The rules for the operator's own kinds, Events and Secrets (cluster-wide or namespaced):
exactly the calls it makes. Both kinds: list and watch (the controllers), get (reading a
malformed object again to name its bad field). IotPolicyBindings: patch (the finalizer that
detaches on delete; TopicBridges have none). Status: patch (server-side apply). Events: create,
and patch to count repeats. Secrets: get, one by name. Only for the controllers that run
(values: controllers). */}}
{{- define "iot-operator.rules" -}}
{{- if has "policy" .Values.controllers }}
- apiGroups: ["iot.operator.dev"]
  resources: ["iotpolicybindings"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["iot.operator.dev"]
  resources: ["iotpolicybindings/status"]
  verbs: ["patch"]
{{- end }}
{{- if has "bridge" .Values.controllers }}
- apiGroups: ["iot.operator.dev"]
  resources: ["topicbridges"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["iot.operator.dev"]
  resources: ["topicbridges/status"]
  verbs: ["patch"]
{{- end }}
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- if and (has "bridge" .Values.controllers) (or .Values.watchNamespace (not .Values.bridgeSecretNamespaces)) }}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}
{{- end -}}
