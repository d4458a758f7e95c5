package command

import "testing"

func BenchmarkDecode(b *testing.B) {
	bodies := []struct {
		name string
		body []byte
	}{
		{"typical", []byte(`{"command_id":"8f14e45f-ceea-467f-a0e6-1b2c3d4e5f60","project_id":"0a1b2c3d4e5f60718293a4b5c6d7e8f9","workspace":"a1b2c3d4e5f6","script_name":"nightly_load","instance_id":"1234567890abcdef","deadline":"2030-01-02T03:04:05.123Z","reason":"operator request"}`)},
		{"minimal with defaults", []byte(`{"script_name":"job","instance_id":"i-1"}`)},
		{"escapes and unicode", []byte(`{"command_id":"c-1","script_name":"\u6570\u636e_load","instance_id":"i-1","reason":"stop \"now\"\n","extra":{"a":[1,2,3,{"b":"c"}]}}`)},
		{"rejected", []byte(`{"script_name":"../etc","instance_id":"i-1"}`)},
		{"not JSON", []byte(`{"script_name":"job",`)},
	}
	m := Meta{MsgID: "msg-1", Stream: "DLF_STOP", Seq: 12}
	d := Defaults{ProjectID: "0a1b2c3d4e5f60718293a4b5c6d7e8f9"}
	for _, bb := range bodies {
		b.Run(bb.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(bb.body)))
			for b.Loop() {
				_, _ = Decode(bb.body, m, d)
			}
		})
	}
}
