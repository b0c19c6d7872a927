{{/*
Every helper takes a context with .Values, .Release and .Chart.Name, so a runtime's chart can call the container
and volume templates in mode "sidecar" with this chart's values (see README.md).
*/}}

{{- define "whatsapp-session-sidecar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "whatsapp-session-sidecar.fullname" -}}
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

{{- define "whatsapp-session-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "whatsapp-session-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "whatsapp-session-sidecar.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "whatsapp-session-sidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: whatsapp-session-sidecar
{{- end }}

{{- define "whatsapp-session-sidecar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "whatsapp-session-sidecar.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "whatsapp-session-sidecar.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Secret holding tokens and the database URL: the user's own, or the one this chart creates. */}}
{{- define "whatsapp-session-sidecar.authSecret" -}}
{{- default (include "whatsapp-session-sidecar.fullname" .) .Values.auth.existingSecret }}
{{- end }}

{{- define "whatsapp-session-sidecar.databaseSecret" -}}
{{- default (printf "%s-database" (include "whatsapp-session-sidecar.fullname" .)) .Values.database.existingSecret }}
{{- end }}

{{- define "whatsapp-session-sidecar.hasDatabase" -}}
{{- if or .Values.database.existingSecret .Values.database.url }}true{{ end }}
{{- end }}

{{/* Tokens always come from a Secret (the user's, or this chart's with given or generated tokens), unless the
user asked for an open listener and gave none. */}}
{{- define "whatsapp-session-sidecar.hasTokens" -}}
{{- if or .Values.auth.existingSecret .Values.auth.apiToken .Values.auth.runtimeToken (not .Values.auth.insecure) }}true{{ end }}
{{- end }}

{{- define "whatsapp-session-sidecar.ownersConfigMap" -}}
{{- if .Values.owners.existingConfigMap }}{{ .Values.owners.existingConfigMap }}
{{- else if .Values.owners.config }}{{ include "whatsapp-session-sidecar.fullname" . }}-owners
{{- end }}
{{- end }}

{{/* Environment shared by the server container and the migrate Job. */}}
{{- define "whatsapp-session-sidecar.databaseEnv" -}}
{{- if include "whatsapp-session-sidecar.hasDatabase" . }}
- name: WA_SIDECAR_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "whatsapp-session-sidecar.databaseSecret" . }}
      key: {{ .Values.database.secretKey }}
- name: WA_SIDECAR_DATABASE_POOLER
  value: {{ .Values.database.pooler | quote }}
{{- end }}
{{- end }}

{{/* The sidecar container: the Deployment's, or added to a runtime's pod in mode "sidecar". */}}
{{- define "whatsapp-session-sidecar.container" -}}
- name: whatsapp-session-sidecar
  image: {{ include "whatsapp-session-sidecar.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: [serve]
  ports:
    - name: http
      containerPort: 9464
      protocol: TCP
  env:
    - name: WA_SIDECAR_LISTEN
      value: "0.0.0.0:9464"
    - name: WA_SIDECAR_INSTANCE
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    - name: WA_SIDECAR_MAX_BAD_MAC_ERRORS
      value: {{ .Values.limits.maxBadMacErrors | quote }}
    - name: WA_SIDECAR_MAX_BAD_DECRYPT_ERRORS
      value: {{ .Values.limits.maxBadDecryptErrors | quote }}
    - name: WA_SIDECAR_CRITICAL_STATUS_CODES
      value: {{ .Values.limits.criticalStatusCodes | quote }}
    - name: WA_SIDECAR_DELETE_PREKEYS_ON_HEAL
      value: {{ .Values.limits.deletePrekeysOnHeal | quote }}
    - name: WA_SIDECAR_STATE_DIR
      value: /var/lib/wa-sidecar
    - name: WA_SIDECAR_STATE_TTL
      value: {{ .Values.housekeeping.stateTtl | quote }}
    - name: WA_SIDECAR_RETENTION
      value: {{ .Values.housekeeping.retention | quote }}
    - name: WA_SIDECAR_SESSION_METRICS
      value: {{ .Values.sessionMetrics.mode | quote }}
    - name: WA_SIDECAR_SESSION_METRICS_WINDOW
      value: {{ .Values.sessionMetrics.window | quote }}
    - name: WA_SIDECAR_DEAF_ACTION
      value: {{ .Values.deafSessions.action | quote }}
    - name: WA_SIDECAR_DEAF_FLOOR
      value: {{ .Values.deafSessions.floor | quote }}
    - name: WA_SIDECAR_DEAF_GAP_FACTOR
      value: {{ .Values.deafSessions.gapFactor | quote }}
    - name: WA_SIDECAR_DEAF_CONFIRM
      value: {{ .Values.deafSessions.confirm | quote }}
    - name: WA_SIDECAR_DEAF_MIN_HISTORY
      value: {{ .Values.deafSessions.minHistory | quote }}
    - name: WA_SIDECAR_COORDINATION
      value: {{ .Values.fleet.coordination | quote }}
    - name: WA_SIDECAR_CLOSE_LEASE_SECONDS
      value: {{ .Values.fleet.closeLeaseSeconds | quote }}
    {{- if .Values.closureLog }}
    - name: WA_SIDECAR_CLOSURE_LOG
      value: /var/lib/wa-sidecar/closures.jsonl
    {{- end }}
    {{- if .Values.keyStore.existingSecret }}
    - name: WA_SIDECAR_KEY_STORE
      valueFrom:
        secretKeyRef:
          name: {{ .Values.keyStore.existingSecret }}
          key: {{ .Values.keyStore.secretKey }}
    {{- else if .Values.keyStore.value }}
    - name: WA_SIDECAR_KEY_STORE
      value: {{ .Values.keyStore.value | quote }}
    {{- end }}
    {{- with include "whatsapp-session-sidecar.databaseEnv" . }}
    {{- . | nindent 4 }}
    {{- end }}
    {{- if include "whatsapp-session-sidecar.hasTokens" . }}
    - name: WA_SIDECAR_API_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ include "whatsapp-session-sidecar.authSecret" . }}
          key: {{ .Values.auth.apiTokenKey }}
    - name: WA_SIDECAR_RUNTIME_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ include "whatsapp-session-sidecar.authSecret" . }}
          key: {{ .Values.auth.runtimeTokenKey }}
    {{- end }}
    {{- if .Values.auth.insecure }}
    - name: WA_SIDECAR_INSECURE
      value: "true"
    {{- end }}
    {{- if include "whatsapp-session-sidecar.ownersConfigMap" . }}
    - name: WA_SIDECAR_OWNERS_FILE
      value: /etc/wa-sidecar/owners/owners.yaml
    {{- end }}
    {{- if .Values.otel.endpoint }}
    - name: OTEL_EXPORTER_OTLP_ENDPOINT
      value: {{ .Values.otel.endpoint | quote }}
    - name: OTEL_EXPORTER_OTLP_PROTOCOL
      value: {{ .Values.otel.protocol | quote }}
    {{- end }}
    {{- if .Values.otel.resourceAttributes }}
    - name: OTEL_RESOURCE_ATTRIBUTES
      value: {{ .Values.otel.resourceAttributes | quote }}
    {{- end }}
    {{- with .Values.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: http
    {{- toYaml .Values.probes.liveness | nindent 4 }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: http
    {{- toYaml .Values.probes.readiness | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  {{- with .Values.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: wa-sidecar-state
      mountPath: /var/lib/wa-sidecar
    - name: wa-sidecar-tmp
      mountPath: /tmp
    {{- if include "whatsapp-session-sidecar.ownersConfigMap" . }}
    - name: wa-sidecar-owners
      mountPath: /etc/wa-sidecar/owners
      readOnly: true
    {{- end }}
    {{- if .Values.owners.secretsSecret }}
    - name: wa-sidecar-owner-secrets
      mountPath: /run/secrets/owners
      readOnly: true
    {{- end }}
    {{- if .Values.keyStore.volume }}
    - name: wa-sidecar-auth-keys
      mountPath: {{ .Values.keyStore.mountPath }}
    {{- end }}
{{- end }}

{{/* The volumes the container mounts. */}}
{{- define "whatsapp-session-sidecar.volumes" -}}
- name: wa-sidecar-state
  emptyDir:
    sizeLimit: {{ .Values.stateVolume.sizeLimit }}
- name: wa-sidecar-tmp
  emptyDir:
    sizeLimit: 64Mi
{{- with include "whatsapp-session-sidecar.ownersConfigMap" . }}
- name: wa-sidecar-owners
  configMap:
    name: {{ . }}
{{- end }}
{{- with .Values.owners.secretsSecret }}
- name: wa-sidecar-owner-secrets
  secret:
    secretName: {{ . }}
{{- end }}
{{- with .Values.keyStore.volume }}
- name: wa-sidecar-auth-keys
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Refuse values that would start a sidecar that refuses to start. */}}
{{- define "whatsapp-session-sidecar.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not (include "whatsapp-session-sidecar.hasDatabase" .)) }}
{{- fail "replicaCount > 1 needs a database (database.existingSecret or database.url): the embedded store is per process" }}
{{- end }}
{{- if and (gt (int .Values.replicaCount) 1) (eq .Values.fleet.coordination "local") }}
{{- fail "replicaCount > 1 needs fleet.coordination fleet: with local, each replica would decide alone" }}
{{- end }}
{{- end }}
