package consumer

import (
	"encoding/json"
	"math"
	"reflect"
	"strings"
	"testing"
	"time"
)

// The hand-written documents must be exactly what encoding/json writes,
// and the hand-read answers exactly what it reads.
func TestHandWrittenJSONMatchesEncodingJSON(t *testing.T) {
	t.Parallel()
	ids := []string{"c-1", "job:42.cancel_x", "DLF_STOP-12", `quote"back\slash`, "<tag>&", "ünï", "nul\x00", ""}
	entries := []cmdEntry{
		{Phase: phaseDecided, Attempts: 1, Status: StatusStopped, Cause: CauseOK},
		{Phase: phaseDecided, Attempts: 0, Status: StatusRejected, Cause: CauseInvalidCommand},
		{Phase: phaseDecided, Attempts: 3},
		{Phase: phaseAnswered, Attempts: 2, Unanswered: true, Delivery: 4},
		{Phase: phasePending, Outcome: json.RawMessage(`{"status":"failed"}`)},
	}
	for _, id := range ids {
		for _, e := range entries {
			want, err := json.Marshal(&stateDoc{Cmds: map[string]*cmdEntry{id: &e}})
			if err != nil {
				t.Fatal(err)
			}
			if got := decidedIndexDoc(id, e); string(got) != string(want) {
				t.Errorf("index doc of %q %+v:\n got %s\nwant %s", id, e, got, want)
			}
		}
		for _, nq := range [][2]uint64{{1, 1}, {7, 1 << 40}, {0, 0}} {
			e := cmdEntry{Phase: phaseSent, Delivery: nq[0], Seq: nq[1], Inst: "p._.=bmlnaHQ.i-" + id}
			want, err := json.Marshal(&stateDoc{Cmds: map[string]*cmdEntry{id: &e}})
			if err != nil {
				t.Fatal(err)
			}
			if got := sentMarkDoc(id, nq[0], nq[1], e.Inst); string(got) != string(want) {
				t.Errorf("sent mark of %q %+v:\n got %s\nwant %s", id, e, got, want)
			}
		}
	}

	for _, by := range ids {
		for _, d := range []stateDoc{
			{StoppedBy: by, StoppedAt: "2026-11-27T10:04:05.123Z", StoppedT: 1795773845},
			{StoppedBy: by},
			{StoppedAt: by, StoppedT: -3},
			{StoppedT: 1},
			{},
			{StoppedBy: by, Cmds: map[string]*cmdEntry{by: &entries[0]}},
		} {
			want, err := json.Marshal(&d)
			if err != nil {
				t.Fatal(err)
			}
			if got, err := stateDocJSON(&d); err != nil || string(got) != string(want) {
				t.Errorf("document %+v:\n got %s, %v\nwant %s", d, got, err, want)
			}
		}
	}

	subjects := []string{"$KV.dlf_stop_state.inst.p.ws._.i-1", "$KV.dlf_stop_state.cmd.YzE", `$KV.b."odd\`}
	want, err := json.Marshal(struct {
		MultiLast []string `json:"multi_last"`
		Batch     int      `json:"batch"`
	}{subjects, len(subjects)})
	if err != nil {
		t.Fatal(err)
	}
	if got := multiLastRequest(subjects); string(got) != string(want) {
		t.Errorf("request:\n got %s\nwant %s", got, want)
	}
}

// Whatever field of cmdEntry is set, the id index document is what
// encoding/json writes: a field added to cmdEntry and forgotten in
// decidedIndexDoc's guard would otherwise be dropped silently (found by
// review: Seq, Inst, Held and the last answer's fields were).
func TestDecidedIndexDocIsEncodingJSON(t *testing.T) {
	t.Parallel()
	typ := reflect.TypeFor[cmdEntry]()
	for i := range typ.NumField() {
		e := cmdEntry{Phase: phaseDecided, Attempts: 1}
		f := reflect.ValueOf(&e).Elem().Field(i)
		switch f.Kind() {
		case reflect.String:
			f.SetString("x")
		case reflect.Bool:
			f.SetBool(true)
		case reflect.Int, reflect.Int64:
			f.SetInt(7)
		case reflect.Uint64:
			f.SetUint(7)
		case reflect.Slice: // Outcome
			f.SetBytes([]byte(`{"s":1}`))
		case reflect.Pointer: // MarkRev
			f.Set(reflect.New(f.Type().Elem()))
		default:
			t.Fatalf("field %s of kind %s: teach this test to set it", typ.Field(i).Name, f.Kind())
		}
		want, err := json.Marshal(&stateDoc{Cmds: map[string]*cmdEntry{"id": &e}})
		if err != nil {
			t.Fatal(err)
		}
		if got := decidedIndexDoc("id", e); string(got) != string(want) {
			t.Errorf("with %s set:\n got %s\nwant %s", typ.Field(i).Name, got, want)
		}
	}
}

func TestParsePubAck(t *testing.T) {
	t.Parallel()
	for _, in := range []string{
		`{"stream":"KV_dlf_stop_state","seq":42}`,
		`{"stream":"KV_dlf_stop_state","domain":"hub","seq":7,"duplicate":true}`,
		`{"stream":"KV_x","seq":18446744073709551615}`,
		`{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 5"},"stream":"KV_x","seq":0}`,
		`{"stream":"KV_x","seq":12x}`,
		`{"stream":"KV_x"}`,
		`not json`,
		``,
	} {
		var want pubAck
		werr := json.Unmarshal([]byte(in), &want)
		got, gerr := parsePubAck([]byte(in))
		if (werr == nil) != (gerr == nil) || !reflect.DeepEqual(got, want) {
			t.Errorf("%s: got %+v, %v; encoding/json %+v, %v", in, got, gerr, want, werr)
		}
	}
}

// The record every stopped command writes is built in one allocation,
// whatever the length of its fields: its buffer was once a byte short and
// grew for every command.
func TestStopRecordIsOneAllocation(t *testing.T) {
	for _, d := range []stateDoc{
		{StoppedBy: "c", StoppedAt: "2026-11-28T10:00:00Z", StoppedT: 1},
		{StoppedBy: "b-123", StoppedAt: FormatTime(time.Unix(1764324000, 123456789)), StoppedT: 1764324000}, // as the benchmark's
		{StoppedBy: strings.Repeat("x", 128) + "@1764324000123456789", StoppedAt: "2026-11-28T10:00:00.123456789+14:00", StoppedT: math.MaxInt64},
		{StoppedBy: "DLF_STOP-18446744073709551615@1764324000123456789", StoppedAt: "2026-11-28T10:00:00.123Z", StoppedT: -1},
	} {
		if n := testing.AllocsPerRun(100, func() { _, _ = stateDocJSON(&d) }); n != 1 {
			t.Errorf("stateDocJSON(%+v): %v allocations, want 1", d, n)
		}
	}
}
