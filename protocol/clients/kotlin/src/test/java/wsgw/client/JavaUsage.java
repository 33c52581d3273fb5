// Compiled (not run) by build.sh: the library's API as a Java app sees it.
package wsgw.client;

import java.util.List;
import okhttp3.OkHttpClient;
import okhttp3.Request;
import okio.ByteString;

final class JavaUsage {
    private JavaUsage() {}

    static ResumableWebSocket open(OkHttpClient client) {
        Options options = new Options();
        options.pingIntervalMillis = 15_000;
        Request request = new Request.Builder().url("wss://gw.example.com/ws").build();
        ResumableWebSocket ws = ResumableWebSocket.connect(client, request, new ResumableListener() {
            @Override
            public void onMessage(ResumableWebSocket ws, String text) {
                System.out.println("text: " + text);
            }

            @Override
            public void onMessage(ResumableWebSocket ws, ByteString bytes) {
                System.out.println("binary: " + bytes.size() + " bytes");
            }

            @Override
            public void onSessionLost(ResumableWebSocket ws, String reason, List<? extends Message> unconfirmed) {
                for (Message m : unconfirmed) {
                    if (m instanceof Message.Text) {
                        System.out.println("maybe not delivered: " + ((Message.Text) m).text);
                    }
                }
            }
        }, options);
        ws.send("hello");
        ws.send(ByteString.of((byte) 1, (byte) 2));
        return ws;
    }
}
