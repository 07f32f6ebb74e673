{{/*
The chart name.
*/}}
{{- define "vap-runner.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name: the runner's name. It names the release's resources, labels
the runner's Scenarios and worker Pods (runner.vap.io/runner) and names its
Lease (`<fullname>-leader`), so it must stay a valid label value (63 chars).
*/}}
{{- define "vap-runner.fullname" -}}
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

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "vap-runner.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every resource of the release.
*/}}
{{- define "vap-runner.labels" -}}
helm.sh/chart: {{ include "vap-runner.chart" . }}
{{ include "vap-runner.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels of the release.
*/}}
{{- define "vap-runner.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vap-runner.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Selector labels of the controller Pods.
*/}}
{{- define "vap-runner.controllerSelectorLabels" -}}
{{ include "vap-runner.selectorLabels" . }}
app.kubernetes.io/component: controller
{{- end }}

{{/*
Labels the controller puts on this runner's worker Pods (see src/controller/pod.rs).
*/}}
{{- define "vap-runner.workerSelectorLabels" -}}
app.kubernetes.io/component: worker
runner.vap.io/runner: {{ include "vap-runner.fullname" . }}
{{- end }}

{{/*
The controller's ServiceAccount.
*/}}
{{- define "vap-runner.serviceAccountName" -}}
{{- if .Values.controller.serviceAccount.create }}
{{- default (include "vap-runner.fullname" .) .Values.controller.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.controller.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The workers' ServiceAccount; empty when workers use the namespace default.
*/}}
{{- define "vap-runner.workerServiceAccountName" -}}
{{- if .Values.worker.serviceAccount.create }}
{{- default (printf "%s-worker" (include "vap-runner.fullname" .)) .Values.worker.serviceAccount.name }}
{{- else }}
{{- .Values.worker.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The controller image.
*/}}
{{- define "vap-runner.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The worker image: the controller's unless overridden.
*/}}
{{- define "vap-runner.workerImage" -}}
{{- $repository := default .Values.image.repository .Values.worker.image.repository }}
{{- $tag := default (default .Chart.AppVersion .Values.image.tag) .Values.worker.image.tag }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{/*
The Kafka consumer group: one per release unless set.
*/}}
{{- define "vap-runner.consumerGroup" -}}
{{- default (include "vap-runner.fullname" .) .Values.consumerGroup }}
{{- end }}

{{/*
The name of the leader Lease (the controller names it `<RUNNER_NAME>-leader`).
*/}}
{{- define "vap-runner.leaseName" -}}
{{- printf "%s-leader" (include "vap-runner.fullname" .) }}
{{- end }}

{{/*
An IPv4 address as an integer.
*/}}
{{- define "vap-runner.ipv4ToInt" -}}
{{- $octets := splitList "." . }}
{{- if ne (len $octets) 4 }}
{{- fail (printf "networkPolicy: %q is not an IPv4 address" .) }}
{{- end }}
{{- add (mul (atoi (index $octets 0)) 16777216) (mul (atoi (index $octets 1)) 65536) (mul (atoi (index $octets 2)) 256) (atoi (index $octets 3)) }}
{{- end }}

{{/*
"true" when IPv4 range .inner lies inside IPv4 range .outer (equal counts);
empty otherwise, and for IPv6 ranges.
*/}}
{{- define "vap-runner.cidrWithin" -}}
{{- if not (or (contains ":" .inner) (contains ":" .outer)) }}
{{- $inner := splitList "/" .inner }}
{{- $outer := splitList "/" .outer }}
{{- $innerBits := 32 }}
{{- if gt (len $inner) 1 }}{{ $innerBits = atoi (index $inner 1) }}{{ end }}
{{- $outerBits := 32 }}
{{- if gt (len $outer) 1 }}{{ $outerBits = atoi (index $outer 1) }}{{ end }}
{{- if ge $innerBits $outerBits }}
{{- $block := 1 }}
{{- range until (sub 32 $outerBits | int) }}{{ $block = mul $block 2 }}{{ end }}
{{- $innerNet := div (include "vap-runner.ipv4ToInt" (index $inner 0) | atoi) $block }}
{{- $outerNet := div (include "vap-runner.ipv4ToInt" (index $outer 0) | atoi) $block }}
{{- if eq $innerNet $outerNet }}true{{ end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
NetworkPolicy `to` entries for a list of allowed ranges: each an ipBlock with
the blocked ranges it contains cut out. Called with dict "cidrs" "blocked" "what".
*/}}
{{- define "vap-runner.ipBlocks" -}}
{{- $blocked := .blocked }}
{{- $what := .what }}
{{- range $cidr := .cidrs }}
{{- range $b := $blocked }}
{{- if include "vap-runner.cidrWithin" (dict "inner" $cidr "outer" $b) }}
{{- fail (printf "networkPolicy.%s.cidrs: %s lies inside the blocked range %s (networkPolicy.blockedCidrs)" $what $cidr $b) }}
{{- end }}
{{- end }}
- ipBlock:
    cidr: {{ $cidr }}
    {{- $except := list }}
    {{- range $b := $blocked }}
    {{- if include "vap-runner.cidrWithin" (dict "inner" $b "outer" $cidr) }}
    {{- $except = append $except $b }}
    {{- end }}
    {{- end }}
    {{- with $except }}
    except:
      {{- toYaml . | nindent 6 }}
    {{- end }}
{{- end }}
{{- end }}
