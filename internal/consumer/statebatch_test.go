package consumer

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
)

// Many concurrent lookups, some of keys that exist, some not, some of the
// same key, all answered right through shared batches.
func TestBatchedLookups(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	st := e.state(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	revs := map[string]uint64{}
	for i := 0; i < 50; i++ {
		key := fmt.Sprintf("inst.k%d", i)
		if err := st.putEntry(ctx, key, "c", cmdEntry{Phase: phaseAnswered, Attempts: i}); err != nil {
			t.Fatal(err)
		}
		r, err := st.load(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		revs[key] = r.rev
	}
	br, err := newBatchReader(e.nc, "dlf_stop_state")
	if err != nil {
		t.Fatal(err)
	}
	defer br.close()
	var wg sync.WaitGroup
	for i := 0; i < 300; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			key := fmt.Sprintf("inst.k%d", i%100) // k50..k99 do not exist; each key asked 3 times
			r, err := br.lookup(ctx, key)
			if err != nil {
				t.Errorf("%s: %v", key, err)
				return
			}
			want, exists := revs[key]
			switch {
			case !exists && (r.rev != 0 || r.doc.Cmds != nil):
				t.Errorf("%s: missing key read as rev %d %+v", key, r.rev, r.doc)
			case exists && (r.rev != want || r.doc.Cmds["c"] == nil || r.doc.Cmds["c"].Attempts != i%100):
				t.Errorf("%s: rev %d (want %d) doc %+v", key, r.rev, want, r.doc)
			}
			if r.doc.Cmds != nil {
				r.doc.Cmds["mine"] = &cmdEntry{} // each caller owns its copy
			}
		}(i)
	}
	wg.Wait()
}

// A batch is a key's absence only when the server says so for every key:
// an end of batch that counts answers it did not send (its byte limit) or
// a 404 other than "No Results" (a message it could not load) fails the
// lookups, which are returned and read again, rather than let a decided
// command look new. A fake server answers here, as JetStream would.
func TestBatchedLookupsTrustOnlyACompleteAnswer(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	data := func(key string, seq int) *nats.Msg {
		m := nats.NewMsg("")
		m.Header.Set("Nats-Subject", "$KV.fake."+key)
		m.Header.Set("Nats-Sequence", fmt.Sprint(seq))
		m.Data = []byte(`{"stopped_by":"x"}`)
		return m
	}
	status := func(code, desc string, hdr ...string) *nats.Msg {
		m := nats.NewMsg("")
		m.Header.Set("Status", code)
		m.Header.Set("Description", desc)
		for i := 0; i+1 < len(hdr); i += 2 {
			m.Header.Set(hdr[i], hdr[i+1])
		}
		return m
	}
	for _, tc := range []struct {
		name    string
		answers []*nats.Msg
		wantErr string // "" : no error
		wantRev uint64 // of key "a"
	}{
		{"complete", []*nats.Msg{data("a", 5), status("204", "EOB", "Nats-Num-Pending", "0")}, "", 5},
		{"none exists", []*nats.Msg{status("404", "No Results")}, "", 0},
		{"cut short", []*nats.Msg{data("a", 5), status("204", "EOB", "Nats-Num-Pending", "1")}, "cut the batch short", 0},
		{"not loaded", []*nats.Msg{status("404", "Message Not Found")}, "status 404 Message Not Found", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sub, err := e.nc.Subscribe("$JS.API.DIRECT.GET.KV_fake", func(req *nats.Msg) {
				for _, m := range tc.answers {
					m.Subject = req.Reply
					_ = e.nc.PublishMsg(m)
				}
			})
			if err != nil {
				t.Fatal(err)
			}
			defer func() { _ = sub.Unsubscribe() }()
			br, err := newBatchReader(e.nc, "fake")
			if err != nil {
				t.Fatal(err)
			}
			defer br.close()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			rec, err := br.lookup(ctx, "b") // "b" is never in an answer
			if tc.wantErr == "" {
				if err != nil || rec.rev != 0 {
					t.Fatalf("lookup of b = %+v, %v; want absent", rec, err)
				}
				rec, err = br.lookup(ctx, "a")
				if err != nil || rec.rev != tc.wantRev {
					t.Fatalf("lookup of a = %+v, %v; want revision %d", rec, err, tc.wantRev)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("lookup of b = %+v, %v; want an error saying %q", rec, err, tc.wantErr)
			}
		})
	}
}

// Answers nats.go dropped as a slow consumer (the reader's channel full)
// fail the batch: the key that was asked for may be among them, and read
// as absent it would make a decided command look new. The reader is held
// after its request until the server's answers overflowed its channel;
// the end of the batch comes once the channel is drained, so only the
// drop check can tell the batch is incomplete.
func TestBatchedLookupsFailWhenAnswersWereDropped(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	br, err := newBatchReader(e.nc, "fake")
	if err != nil {
		t.Fatal(err)
	}
	defer br.close()
	overflow := cap(br.msgs) + 100
	sendEnd := make(chan struct{})
	// Polled on the reader's goroutine (testutil.Eventually may not fail
	// the test from there).
	wait := func(what string, cond func() bool) bool {
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); <-tick.C {
			if cond() {
				return true
			}
		}
		t.Errorf("%s: not within 10s", what)
		return false
	}
	br.afterRequest = func() {
		// Everything beyond the channel's room is dropped, "b" last.
		if !wait("answers dropped", func() bool { d, _ := br.sub.Dropped(); return d > overflow-cap(br.msgs) }) {
			close(sendEnd)
			return
		}
		go func() {
			wait("channel drained", func() bool { return len(br.msgs) == 0 })
			close(sendEnd)
		}()
	}
	sub, err := e.nc.Subscribe("$JS.API.DIRECT.GET.KV_fake", func(req *nats.Msg) {
		for i := 0; i <= overflow; i++ {
			key := fmt.Sprintf("k%d", i)
			if i == overflow {
				key = "b" // the one asked for, among the dropped
			}
			m := nats.NewMsg(req.Reply)
			m.Header.Set("Nats-Subject", "$KV.fake."+key)
			m.Header.Set("Nats-Sequence", fmt.Sprint(i+1))
			m.Data = []byte(`{"stopped_by":"x"}`)
			_ = e.nc.PublishMsg(m)
		}
		<-sendEnd
		end := nats.NewMsg(req.Reply)
		end.Header.Set("Status", "204")
		end.Header.Set("Description", "EOB")
		end.Header.Set("Nats-Num-Pending", "0")
		_ = e.nc.PublishMsg(end)
	})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	rec, err := br.lookup(ctx, "b")
	if err == nil || !strings.Contains(err.Error(), "dropped") {
		t.Fatalf("lookup of b = %+v, %v; want an error saying answers were dropped", rec, err)
	}
}
