{{/* "true" when a monitoring object of kind with enabled=$mode is rendered: true, or
"auto" and the cluster serves monitoring.coreos.com/v1. */}}
{{- define "eventtermq.monitoringEnabled" -}}
{{- $mode := .mode }}
{{- if or (eq (toString $mode) "true") (and (eq (toString $mode) "auto") (.root.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")) }}true{{ end }}
{{- end }}

{{/* Relabelling shared by the ServiceMonitor and the PodMonitor: the labels the
dashboard and the alerts group by. */}}
{{- define "eventtermq.monitoringRelabelings" -}}
- sourceLabels: [__meta_kubernetes_namespace]
  targetLabel: kubernetes_namespace
- sourceLabels: [__meta_kubernetes_pod_label_app_kubernetes_io_instance]
  targetLabel: {{ .Values.monitoring.clusterLabel }}
- sourceLabels: [__meta_kubernetes_pod_name]
  targetLabel: pod
{{- end }}

{{/* The alert rule groups (the PrometheusRule's spec; e2e runs them through promtool
and a real Prometheus). */}}
{{- define "eventtermq.alertGroups" -}}
{{- $r := .Values.monitoring.prometheusRule }}
{{- $by := printf "kubernetes_namespace, %s" .Values.monitoring.clusterLabel }}
groups:
  - name: eventtermq
    rules:
      - alert: EventterMQConsumerLagGrowing
        expr: |-
          (sum by ({{ $by }}, namespace, group) (eventtermq_consumer_group_lag_records) > {{ $r.consumerLagMinRecords }})
          and
          (sum by ({{ $by }}, namespace, group) (deriv(eventtermq_consumer_group_lag_records[5m])) > 0)
        for: {{ $r.consumerLagGrowingFor }}
        labels:
          severity: warning
        annotations:
          summary: Consumer group {{ "{{ $labels.namespace }}/{{ $labels.group }}" }} falls behind
          description: The lag of consumer group {{ "{{ $labels.namespace }}/{{ $labels.group }}" }} ({{ "{{ $value }}" }} messages) has been growing for {{ $r.consumerLagGrowingFor }}; its subscribers consume more slowly than publishers publish, or none is connected.
      - alert: EventterMQUnderReplicatedSegments
        expr: max by ({{ $by }}) (eventtermq_replication_under_replicated_segments) > 0
        for: {{ $r.underReplicatedFor }}
        labels:
          severity: warning
        annotations:
          summary: EventterMQ cluster {{ "{{ $labels." }}{{ .Values.monitoring.clusterLabel }}{{ " }}" }} has under-replicated segments
          description: '{{ "{{ $value }}" }} segments have fewer copies on live brokers than their replication factor: a broker is down or the cluster has fewer brokers than a topic''s replication factor.'
      - alert: EventterMQNoRaftLeader
        expr: max by ({{ $by }}) (eventtermq_raft_is_leader) < 1
        for: {{ $r.noLeaderFor }}
        labels:
          severity: critical
        annotations:
          summary: EventterMQ cluster {{ "{{ $labels." }}{{ .Values.monitoring.clusterLabel }}{{ " }}" }} has no Raft leader
          description: No broker of the cluster is Raft leader; creating or changing topics and groups, and opening segments, fail until one is elected (a majority of voters must be up and reach each other).
      - alert: EventterMQDiskAlmostFull
        expr: eventtermq_disk_free_bytes < {{ $r.diskAlmostFullFactor }} * eventtermq_disk_free_min_bytes
        for: {{ $r.diskAlmostFullFor }}
        labels:
          severity: warning
        annotations:
          summary: Broker {{ "{{ $labels.pod }}" }} is running out of disk
          description: '{{ "{{ $value | humanize1024 }}" }}B free on the data directory of {{ "{{ $labels.pod }}" }}, under {{ $r.diskAlmostFullFactor }} times its watermark; below the watermark it refuses publishes.'
      - alert: EventterMQDiskLow
        expr: eventtermq_disk_low > 0
        for: {{ $r.diskLowFor }}
        labels:
          severity: critical
        annotations:
          summary: Broker {{ "{{ $labels.pod }}" }} refuses data (disk below its watermark)
          description: The broker's free disk space is below --disk-free-min-bytes; it refuses publishes and replicated records, and its segments move to other brokers. Grow the volume or shorten retention.
{{- end }}
