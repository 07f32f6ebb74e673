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
The namespace of the runner: `namespace.name`, else the release's.
*/}}
{{- define "vap-runner.namespace" -}}
{{- default .Release.Namespace .Values.namespace.name }}
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
KAFKA_BOOTSTRAP_SERVERS; refuses to render without it (there is no default
that could work: localhost in a Pod is the Pod itself).
*/}}
{{- define "vap-runner.bootstrapServers" -}}
{{- $servers := trim .Values.kafka.bootstrapServers }}
{{- if not $servers }}
{{- fail "kafka.bootstrapServers is required: the Kafka brokers as the runner's Pods reach them, host:port[,host:port...]. Set it, e.g. --set kafka.bootstrapServers=kafka.example:9092" }}
{{- end }}
{{- $servers }}
{{- end }}

{{/*
"true" when a bootstrap server is a loopback name or address: in a Pod that is
the Pod itself.
*/}}
{{- define "vap-runner.bootstrapIsLoopback" -}}
{{- range splitList "," .Values.kafka.bootstrapServers }}
{{- $host := regexReplaceAll `\]?:[0-9]+$` (trim . | trimPrefix "[") "" | lower }}
{{- if or (eq $host "localhost") (hasPrefix "127." $host) (eq $host "::1") }}true{{ end }}
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
An IPv6 address as 32 lower-case hex digits (no embedded IPv4 form).
*/}}
{{- define "vap-runner.ipv6Hex" -}}
{{- $halves := splitList "::" (lower .) }}
{{- if gt (len $halves) 2 }}
{{- fail (printf "networkPolicy: %q is not an IPv6 address" .) }}
{{- end }}
{{- $left := list }}
{{- if index $halves 0 }}{{ $left = splitList ":" (index $halves 0) }}{{ end }}
{{- $right := list }}
{{- if and (eq (len $halves) 2) (index $halves 1) }}{{ $right = splitList ":" (index $halves 1) }}{{ end }}
{{- $groups := $left }}
{{- if eq (len $halves) 2 }}
{{- range until (sub 8 (add (len $left) (len $right)) | int) }}{{ $groups = append $groups "0" }}{{ end }}
{{- end }}
{{- $groups = concat $groups $right }}
{{- if ne (len $groups) 8 }}
{{- fail (printf "networkPolicy: %q is not an IPv6 address" .) }}
{{- end }}
{{- range $groups }}{{ printf "%4s" . | replace " " "0" }}{{ end }}
{{- end }}

{{/*
"true" when IPv6 range .inner lies inside IPv6 range .outer; empty otherwise.
*/}}
{{- define "vap-runner.cidr6Within" -}}
{{- $inner := splitList "/" .inner }}
{{- $outer := splitList "/" .outer }}
{{- $innerBits := 128 }}
{{- if gt (len $inner) 1 }}{{ $innerBits = atoi (index $inner 1) }}{{ end }}
{{- $outerBits := 128 }}
{{- if gt (len $outer) 1 }}{{ $outerBits = atoi (index $outer 1) }}{{ end }}
{{- if ge $innerBits $outerBits }}
{{- $a := include "vap-runner.ipv6Hex" (index $inner 0) }}
{{- $b := include "vap-runner.ipv6Hex" (index $outer 0) }}
{{- $nibbles := div $outerBits 4 | int }}
{{- $rest := mod $outerBits 4 | int }}
{{- if eq (substr 0 $nibbles $a) (substr 0 $nibbles $b) }}
{{- if eq $rest 0 }}true{{ else }}
{{- $hex := dict "0" 0 "1" 1 "2" 2 "3" 3 "4" 4 "5" 5 "6" 6 "7" 7 "8" 8 "9" 9 "a" 10 "b" 11 "c" 12 "d" 13 "e" 14 "f" 15 }}
{{- $step := index (list 1 8 4 2) $rest }}
{{- $x := index $hex (substr $nibbles (add1 $nibbles | int) $a) }}
{{- $y := index $hex (substr $nibbles (add1 $nibbles | int) $b) }}
{{- if eq (div $x $step) (div $y $step) }}true{{ end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
"true" when range .inner lies inside range .outer of the same family;
empty otherwise.
*/}}
{{- define "vap-runner.cidrWithin" -}}
{{- if and (contains ":" .inner) (contains ":" .outer) }}
{{- include "vap-runner.cidr6Within" . }}
{{- else if not (or (contains ":" .inner) (contains ":" .outer)) }}
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

{{/*
KAFKA_SECURITY_PROTOCOL: as given, or from kafka.tls.enabled and
kafka.sasl.enabled; empty for plaintext.
*/}}
{{- define "vap-runner.kafkaProtocol" -}}
{{- $k := .Values.kafka -}}
{{- if $k.securityProtocol -}}
{{- $k.securityProtocol -}}
{{- else if and $k.tls.enabled $k.sasl.enabled -}}
sasl_ssl
{{- else if $k.tls.enabled -}}
ssl
{{- else if $k.sasl.enabled -}}
sasl_plaintext
{{- end -}}
{{- end }}

{{/*
Where the controller finds the Kafka files the chart mounts.
*/}}
{{- define "vap-runner.kafkaDir" -}}
/etc/vap-runner/kafka
{{- end }}

{{/*
KAFKA_PROPERTIES: kafka.properties as key=value lines, sorted.
*/}}
{{- define "vap-runner.kafkaProperties" -}}
{{- $lines := list -}}
{{- range $k, $v := . -}}
{{- $lines = append $lines (printf "%s=%v" $k $v) -}}
{{- end -}}
{{- join "\n" $lines -}}
{{- end }}
