package consumer

import (
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the worker's Prometheus series; every name starts dlf_stop_.
type Metrics struct {
	commands     *prometheus.CounterVec
	calls        *prometheus.CounterVec
	callDuration prometheus.Histogram
	retries      *prometheus.CounterVec
	inFlight     prometheus.Gauge
	held         prometheus.Gauge
	publishFail  *prometheus.CounterVec
	panics       prometheus.Counter
	returned     *prometheus.CounterVec
	circuitOpen  prometheus.Gauge
	skipped      prometheus.Counter
	reusedIDs    prometheus.Counter
	throttled    prometheus.Counter
	stateReadErr prometheus.Counter
}

// NewMetrics registers the series on reg (use prometheus.NewRegistry() in
// tests so parallel workers do not collide).
func NewMetrics(reg prometheus.Registerer) (*Metrics, error) {
	m := &Metrics{
		commands: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dlf_stop_commands_total",
			Help: "Commands decided, by outcome status and cause.",
		}, []string{"status", "cause"}),
		calls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dlf_stop_dlf_calls_total",
			Help: "DLF stop calls made, by HTTP status (0: no answer).",
		}, []string{"code"}),
		callDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "dlf_stop_dlf_call_duration_seconds",
			Help:    "Duration of one DLF stop call.",
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}),
		retries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dlf_stop_retries_total",
			Help: "Retries scheduled, by where the command waits (in_process or redelivery).",
		}, []string{"wait"}),
		inFlight: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "dlf_stop_dlf_calls_in_flight",
			Help: "DLF calls on the wire now (at most WORKER_CONCURRENCY).",
		}),
		held: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "dlf_stop_commands_in_flight",
			Help: "Commands this worker holds now: calling, waiting in-process or publishing.",
		}),
		publishFail: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dlf_stop_publish_failures_total",
			Help: "Outcome or dead-letter publishes that got no stored-ack (the command was returned), and decision records the state bucket refused after the outcome was stored (the command is held and the record tried again); one per failed try.",
		}, []string{"kind"}),
		panics: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dlf_stop_panics_total",
			Help: "Panics recovered while processing a command; the command was returned.",
		}),
		returned: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "dlf_stop_commands_returned_total",
			Help: "Commands handed back to JetStream undecided, by reason.",
		}, []string{"reason"}),
		circuitOpen: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "dlf_stop_circuit_open",
			Help: "1 while the DLF circuit is open (fetching paused, one probe call at a time).",
		}),
		skipped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dlf_stop_commands_already_decided_total",
			Help: "Deliveries acked without a call or outcome because the state bucket had them decided.",
		}),
		reusedIDs: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dlf_stop_command_ids_reused_total",
			Help: "Commands whose id another command with that id had decided (contract section 6: acked without an outcome of their own); a publisher reuses ids.",
		}),
		throttled: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dlf_stop_throttled_total",
			Help: "429 answers from DLF; each pauses every call of this worker.",
		}),
		stateReadErr: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "dlf_stop_state_read_failures_total",
			Help: "State bucket lookups that failed; the command stays held and reads again, and is returned only if the bucket stays unreadable.",
		}),
	}
	for _, c := range []prometheus.Collector{m.commands, m.calls, m.callDuration, m.retries,
		m.inFlight, m.held, m.publishFail, m.panics, m.returned, m.circuitOpen, m.skipped, m.reusedIDs, m.throttled,
		m.stateReadErr} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

func (m *Metrics) observeCall(code int, d time.Duration) {
	m.calls.WithLabelValues(strconv.Itoa(code)).Inc()
	m.callDuration.Observe(d.Seconds())
}
