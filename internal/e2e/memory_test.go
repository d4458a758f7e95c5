package e2e

import (
	"context"
	"errors"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/dlf-stop/worker/internal/consumer"
	"github.com/dlf-stop/worker/internal/dlf/emulator"
)

// TestBacklogMemory holds the worker to the memory bound in every
// CI run: its resident memory stays under 150 MB while 100,000 commands
// wait in the stream. BenchmarkBacklogMemory reports the same figure.
func TestBacklogMemory(t *testing.T) {
	const backlog = 100_000
	peak := backlogPeakRSS(t, backlog, 10*time.Second)
	t.Logf("backlog_memory commands_waiting=%d peak_rss_MB=%.1f", backlog, float64(peak)/1024)
	if limit := int64(150 << 10); peak > limit { // KiB
		t.Errorf("peak RSS %.1f MB is over the 150 MB the worker may use", float64(peak)/1024)
	}
}

// BenchmarkBacklogMemory measures the worker process's resident memory
// while 100,000 commands wait in the stream (and it works through them
// against a 50 ms DLF). The worker only pulls what it can hold, so the
// backlog stays in JetStream, not in the worker.
//
//	go test -run '^$' -bench BenchmarkBacklogMemory -benchtime 1x ./internal/e2e/
func BenchmarkBacklogMemory(b *testing.B) {
	const backlog = 100_000
	for i := 0; i < b.N; i++ {
		peak := backlogPeakRSS(b, backlog, 10*time.Second)
		b.ReportMetric(float64(peak)/1024, "peak_rss_MB")
		b.ReportMetric(0, "ns/op")
		b.Logf("worker peak RSS with %d commands waiting: %.1f MB", backlog, float64(peak)/1024)
		if limit := int64(150 << 10); peak > limit { // KiB
			b.Errorf("peak RSS %.1f MB is over the 150 MB the worker may use", float64(peak)/1024)
		}
	}
}

func backlogPeakRSS(b testing.TB, backlog int, watch time.Duration) int64 {
	srv, _, js := startJetStream(b)
	emu, emuURL := emulator.StartForTest(b, emulator.WithRequestLogSize(0))
	emu.SetFaults(emulator.Faults{Latency: 50 * time.Millisecond})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := consumer.Setup(ctx, js, consumer.Config{}, zap.NewNop()); err != nil {
		b.Fatal(err)
	}
	for i := 0; i < backlog; i++ {
		id := "m-" + strconv.Itoa(i)
		emu.AddRunning("p", "", "s", id)
		body := []byte(`{"command_id":"` + id + `","project_id":"p","script_name":"s","instance_id":"` + id + `"}`)
		for {
			_, err := js.PublishAsync("dlf.stop.request", body)
			if err == nil {
				break
			}
			if !errors.Is(err, jetstream.ErrTooManyStalledMsgs) {
				b.Fatal(err)
			}
			<-js.PublishAsyncComplete()
		}
	}
	<-js.PublishAsyncComplete()

	w := startWorkerBin(b, plainWorkerBin, map[string]string{
		"NATS_URL":                   srv.ClientURL(),
		"DLF_ENDPOINT":               emuURL,
		"HUAWEICLOUD_SDK_PROJECT_ID": "p",
		"HTTP_ADDR":                  anyPort,
		"WORKER_CONCURRENCY":         "256",
		"LOG_LEVEL":                  "warn",
	})
	pid := w.cmd.Process.Pid
	var peak int64
	end := time.Now().Add(watch)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for time.Now().Before(end) {
		<-tick.C
		_, hwm, err := rssKiB(pid)
		if err != nil {
			b.Fatalf("worker exited: %v; logs: %v", err, w.lines())
		}
		peak = hwm
	}
	if calls := emu.StopCalls(); calls == 0 {
		b.Fatalf("the worker made no DLF call; logs: %v", w.lines())
	} else {
		b.Logf("DLF calls during the watch: %d", calls)
	}
	return peak
}
