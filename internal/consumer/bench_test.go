package consumer

import (
	"slices"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/dlf-stop/worker/internal/dlf/emulator"
)

// BenchmarkPipeline pushes b.N commands through embedded JetStream, the
// worker and the emulator over HTTP, and reports commands per second and
// the p50/p99 latency from publish to stored outcome. Run it with a fixed
// count so the figures are comparable:
//
//	go test -run '^$' -bench BenchmarkPipeline -benchtime 20000x ./internal/consumer/
func BenchmarkPipeline(b *testing.B) {
	cases := []struct {
		name        string
		latency     time.Duration
		concurrency int
	}{
		{"latency=0/concurrency=32", 0, 32},
		{"latency=50ms/concurrency=256", 50 * time.Millisecond, 256},
	}
	for _, tc := range cases {
		// reliability=off runs without the state bucket and the circuit:
		// the baseline the reliability features are measured against.
		for _, rel := range []string{"on", "off"} {
			b.Run(tc.name+"/reliability="+rel, func(b *testing.B) {
				benchPipeline(b, tc.latency, tc.concurrency, rel == "off")
			})
		}
	}
}

func benchPipeline(b *testing.B, latency time.Duration, concurrency int, plain bool) {
	e := newEnvWith(b, func(c *Config) {
		c.Concurrency = concurrency
		c.CallTimeout = 10 * time.Second
		c.DisableState = plain
		c.DisableCircuit = plain
	}, emulator.WithRequestLogSize(0))
	e.emu.SetFaults(emulator.Faults{Latency: latency})
	n := b.N
	bodies := make([][]byte, n)
	for i := range bodies {
		id := "b-" + strconv.Itoa(i)
		e.emu.AddRunning(proj, "", "s1", id)
		bodies[i] = []byte(`{"command_id":"` + id + `","project_id":"` + proj + `","script_name":"s1","instance_id":"` + id + `"}`)
	}

	// Outcomes are seen on a core subscription: the worker publishes them
	// with a stored-ack, so arrival here follows their storage.
	sent := make([]time.Time, n)
	lat := make([]time.Duration, 0, n)
	var slow []string // ids that took over 10s, to explain a stall
	var mu sync.Mutex
	done := make(chan struct{})
	sub, err := e.nc.Subscribe("dlf.stop.outcome.*", func(m *nats.Msg) {
		id := m.Header.Get(nats.MsgIdHdr)
		i, err := strconv.Atoi(id[2:])
		if err != nil {
			return
		}
		mu.Lock()
		l := time.Since(sent[i])
		lat = append(lat, l)
		if l > 10*time.Second && len(slow) < 5 {
			slow = append(slow, id+" "+string(m.Data))
		}
		if len(lat) == n {
			close(done)
		}
		mu.Unlock()
	})
	if err != nil {
		b.Fatal(err)
	}
	defer sub.Unsubscribe()
	e.startWorker(nil)

	b.ResetTimer()
	cpu0 := cpuTime()
	start := time.Now()
	for i := 0; i < n; i++ {
		m := nats.NewMsg("dlf.stop.request")
		m.Data = bodies[i]
		mu.Lock()
		sent[i] = time.Now()
		mu.Unlock()
		// Block while 4,000 publishes await their acks rather than fail:
		// the publisher must not outrun the server unboundedly.
		if _, err := e.js.PublishMsgAsync(m, jetstream.WithStallWait(time.Minute)); err != nil {
			b.Fatal(err)
		}
	}
	select {
	case <-done:
	case <-time.After(5 * time.Minute):
		b.Fatalf("only %d of %d outcomes", len(lat), n)
	}
	elapsed := time.Since(start)
	cpu := cpuTime() - cpu0
	b.StopTimer()

	mu.Lock()
	slices.Sort(lat)
	p50, p99 := lat[len(lat)/2], lat[len(lat)*99/100]
	mu.Unlock()
	b.ReportMetric(float64(n)/elapsed.Seconds(), "cmds/s")
	b.ReportMetric(float64(p50.Microseconds())/1000, "p50_ms")
	b.ReportMetric(float64(p99.Microseconds())/1000, "p99_ms")
	// CPU per command is steadier than throughput on a shared machine,
	// whose speed drifts between runs; both count the whole process
	// (server, worker, emulator and publisher).
	b.ReportMetric(float64(cpu.Microseconds())/float64(n), "cpu_us/cmd")
	b.ReportMetric(0, "ns/op")
	if calls := e.emu.StopCalls(); calls != int64(n) {
		b.Errorf("DLF calls = %d, want %d", calls, n)
	}
	for _, s := range slow {
		b.Logf("slow: %s", s)
	}
	b.Logf("%d commands in %s: %.0f cmds/s, p50 %s, p99 %s", n, elapsed.Round(time.Millisecond),
		float64(n)/elapsed.Seconds(), p50, p99)
}

// cpuTime is the CPU the whole process has used, user and system.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
