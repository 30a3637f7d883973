{{- define "keelson.labels" -}}
app.kubernetes.io/name: keelson
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "keelson.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end }}

{{- define "keelson.store" -}}
{{- if .Values.store -}}
{{ .Values.store }}
{{- else if .Values.etcd.enabled -}}
{{- $r := .Release.Name -}}
etcd://{{ $r }}-etcd-0.{{ $r }}-etcd:2379,{{ $r }}-etcd-1.{{ $r }}-etcd:2379,{{ $r }}-etcd-2.{{ $r }}-etcd:2379
{{- else -}}
{{ fail "set store to your etcd's URL, or etcd.enabled=true" }}
{{- end -}}
{{- end }}

{{- define "keelson.storeEnv" -}}
- name: KEELSON_STORE
  value: {{ include "keelson.store" . | quote }}
- name: KEELSON_CLUSTER
  value: {{ .Values.clusterName | quote }}
{{- end }}

{{- define "keelson.podSecurity" -}}
runAsNonRoot: true
runAsUser: 999
runAsGroup: 999
fsGroup: 999
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "keelson.containerSecurity" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
{{- end }}

{{- define "keelson.antiAffinity" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            app.kubernetes.io/instance: {{ .root.Release.Name }}
            app.kubernetes.io/component: {{ .component }}
{{- end }}
