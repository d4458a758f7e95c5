package consumer

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"
)

// Many concurrent lookups, some of keys that exist, some not, some of the
// same key, all answered right through shared batches.
func TestBatchedLookups(t *testing.T) {
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
